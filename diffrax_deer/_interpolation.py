r"""Dense output inside one DEER window of `N` uniformly spaced grid points.

Two interpolations, one per discretisation (see [`diffrax_deer.DEER`][]):

- `HermiteGridInterpolation` (the exponential scheme): piecewise cubic Hermite. On grid
  interval $[t_k, t_{k+1}]$ with $s = (t - t_k)/\Delta$,

  $$y(t) = h_{00}(s)\, y_k + \Delta h_{10}(s)\, f_k + h_{01}(s)\, y_{k+1}
  + \Delta h_{11}(s)\, f_{k+1},$$

  where $f_k = f(t_k, y_k)$ are the slopes at the converged grid values. Its error is
  $O(\Delta^4)$, below the $O(\Delta^2)$ error of the grid values, so dense output keeps
  the scheme's accuracy. Zero-length intervals (a window diffrax makes one ulp long)
  are evaluated at their left end, with slope $f_k$.
- `RungeKuttaGridInterpolation` (a Runge--Kutta discretisation): on each grid interval,
  the Runge--Kutta solver's *own* local interpolation (e.g. Tsit5's 4th-order
  polynomial, built from that step's stages), exactly as diffrax's sequential solver
  with a constant step size would give it.

Both locate the interval of `t` the same way (`_AbstractGridInterpolation._locate`),
and read each array of the window once per evaluation, as one slice (`_pair`): in
reverse mode that keeps the cost of each time saved inside a window independent of the
window's length.
"""

from collections.abc import Callable

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import AbstractLocalInterpolation
from jaxtyping import Array, PyTree, Real


def _safe_divide(a, b):
    """`a / b`, and 0 where `b == 0` (with finite derivatives there too)."""
    nonzero = b != 0
    return jnp.where(nonzero, a / jnp.where(nonzero, b, 1), 0)


def _pair(x: Array, k) -> tuple[Array, Array]:
    """`x[k]` and `x[k + 1]`, read as one slice of two rows. diffrax's save loop
    (`SaveAt(ts=...)`) evaluates the interpolation once per saved time, and its reverse
    pass adds each evaluation's cotangent of the window's arrays to a running sum. XLA
    updates that sum in place where the evaluation reads an array through one slice,
    but rewrites the whole `(N, ...)` array per saved time where it reads it twice
    (measured, CPU, py3.11, `RecursiveCheckpointAdjoint`, one window of Van der Pol,
    T = 1e5: gradient with 200 saved times 94 -> 74 ms, with one 66 ms; two reads of a
    `(1e5, 2)` array cost 40 us per saved time, one 0.1 us). `DirectAdjoint`'s
    bounded loop, whose steps run inside `lax.cond`, rewrites the array either way."""
    rows = lax.dynamic_slice_in_dim(x, k, 2, axis=0)
    return rows[0], rows[1]


class _AbstractGridInterpolation(AbstractLocalInterpolation):
    """Interpolation over a uniform, increasing grid `ts` of `N` points (diffrax hands
    solvers increasing times, also when integrating backwards)."""

    t0: eqx.AbstractVar[Real[Array, ""]]
    t1: eqx.AbstractVar[Real[Array, ""]]
    ts: eqx.AbstractVar[Real[Array, " N"]]

    def _locate(self, t):
        """The interval `k` of `t`, its ends `ta`, `tb` and `s = (t - ta) / (tb - ta)`."""
        # The grid is uniform: the interval index is arithmetic, then corrected by one
        # either way against the stored times (robust to rounding; cheaper than a
        # binary search when interpolating a whole fine grid). A window (or interval)
        # of zero length, which diffrax produces when `t0 + (t1 - t0)` rounds below
        # `t1`, gives `s = 0` rather than 0/0. (The index is not differentiated: the
        # times are read for it without their derivative, and once more, as one
        # slice, for `s`; see `_pair`.)
        ts = lax.stop_gradient(self.ts)
        n = ts.shape[0]
        frac = _safe_divide(t - ts[0], ts[-1] - ts[0])
        k = jnp.floor(frac * (n - 1)).astype(jnp.int32)
        k = jnp.clip(k, 0, n - 2)
        k = jnp.where(t < ts[k], k - 1, jnp.where(t >= ts[k + 1], k + 1, k))
        k = jnp.clip(k, 0, n - 2)
        ta, tb = _pair(self.ts, k)
        return k, ta, tb, _safe_divide(t - ta, tb - ta)


class HermiteGridInterpolation(_AbstractGridInterpolation):
    """Cubic Hermite interpolation from the grid values and slopes (see module doc)."""

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    ts: Real[Array, " N"]
    ys: PyTree[Array]  # leaves (N, ...)
    fs: PyTree[Array]  # slopes f(t_k, y_k), leaves (N, ...)

    def _eval(self, t):
        k, ta, tb, s = self._locate(t)
        delta = tb - ta
        h00 = (1 + 2 * s) * (1 - s) ** 2
        h10 = delta * s * (1 - s) ** 2
        h01 = s**2 * (3 - 2 * s)
        h11 = delta * s**2 * (s - 1)

        def leaf(y, f):
            (ya, yb), (fa, fb) = _pair(y, k), _pair(f, k)
            return h00 * ya + h10 * fa + h01 * yb + h11 * fb

        return jtu.tree_map(leaf, self.ys, self.fs)

    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree[Array]:
        del left
        if t1 is None:
            return self._eval(t0)
        return jtu.tree_map(lambda a, b: a - b, self._eval(t1), self._eval(t0))

    def derivative(self, t, left: bool = True) -> PyTree[Array]:
        del left
        k, ta, tb, s = self._locate(t)
        d01 = _safe_divide(6 * s * (1 - s), tb - ta)
        d10 = (1 - s) * (1 - 3 * s)
        d11 = s * (3 * s - 2)

        def leaf(y, f):
            (ya, yb), (fa, fb) = _pair(y, k), _pair(f, k)
            return d01 * (yb - ya) + d10 * fa + d11 * fb

        return jtu.tree_map(leaf, self.ys, self.fs)


class RungeKuttaGridInterpolation(_AbstractGridInterpolation):
    """A Runge--Kutta solver's own local interpolation on every grid interval.

    `infos` holds the `dense_info` of the solver's `step` over each interval, stacked
    (leaves `(N - 1, ...)`); `local_cls` is the solver's `interpolation_cls`, called as
    diffrax calls it: `local_cls(t0=t_k, t1=t_{k+1}, **infos[k])`.
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    ts: Real[Array, " N"]
    infos: PyTree[Array]
    local_cls: Callable[..., AbstractLocalInterpolation] = eqx.field(static=True)

    def _local(self, t) -> AbstractLocalInterpolation:
        k, ta, tb, _ = self._locate(t)
        info = jtu.tree_map(lambda x: x[k], self.infos)  # (one read of each array)
        return self.local_cls(t0=ta, t1=tb, **info)

    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree[Array]:
        del left
        if t1 is None:
            return self._local(t0).evaluate(t0)
        return jtu.tree_map(lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0))

    def derivative(self, t, left: bool = True) -> PyTree[Array]:
        del left
        return self._local(t).derivative(t)
