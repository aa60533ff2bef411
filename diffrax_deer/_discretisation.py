r"""ODE discretisations that turn `(term, window)` into a trajectory problem.

`AbstractWindowScheme` is what the solver and the coarse-grid predictor need from a
discretisation; the schemes are the exponential scheme below and the explicit
Runge--Kutta maps of `_runge_kutta.py`.

The exponential scheme of the DEER paper (Lim et al., 2024). On a uniform grid
$t_0 < \dots < t_{N-1}$ with spacing $\Delta$, write $F_k = \Delta f(t_k, y_k)$ and
$J_k = \partial F_k / \partial y_k$ (both scaled by $\Delta$). Linearising $f$ about the
current trajectory and averaging the Jacobian over each interval by the trapezoid rule
gives the linear ODE

$$\Delta\, y' = \bar J_k y + \bar h_k, \qquad
\bar J_k = \tfrac12 (J_k + J_{k+1}),\quad
\bar h_k = \tfrac12 (F_k - J_k y_k + F_{k+1} - J_{k+1} y_{k+1}),$$

solved exactly over the interval:

$$y_{k+1} = e^{\bar J_k} y_k + \varphi_1(\bar J_k)\, \bar h_k .$$

This is a linear recurrence in $y$ (one Newton iteration); its fixed point is a
2nd-order accurate discretisation of the ODE. With `jacobian="diagonal"` (quasi-DEER)
$J_k$ is replaced by its diagonal, the exponentials are elementwise, and the fixed point
is the corresponding exponential scheme with a diagonal linear part (also 2nd order).
"""

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from diffrax import AbstractLocalInterpolation, AbstractTerm
from equinox.internal import ω
from jaxtyping import Array, Float, PyTree, Real

from ._batched import identity_like, matvec
from ._expm import exp_phi1_diagonal, expm, expm1_phi1, expm_action, expm_phi1
from ._interpolation import HermiteGridInterpolation
from ._jacobian import value_and_jacobian
from ._misc import TreeFlattener
from ._newton import AbstractTrajectoryProblem, previous_states
from ._sharding import TimeSharding


def uniform_grid(t0, t1, num_points: int) -> Real[Array, " N"]:
    """`num_points` uniformly spaced times from `t0` to `t1`, both included exactly."""
    frac = jnp.arange(num_points) / (num_points - 1)
    t0 = jnp.asarray(t0)
    ts = t0 + (t1 - t0) * frac.astype(jnp.result_type(t0, float))
    return ts.at[-1].set(t1)


class AbstractWindowScheme(AbstractTrajectoryProblem):
    """A discretisation of the ODE over one window of `num_points` uniformly spaced
    grid points from `t0` to `t1`, as a trajectory problem for the Newton layer.

    `terms` is the (possibly direction-wrapped) `diffrax.ODETerm`; the state is flat.
    Besides the Newton layer's `linearise` / `residual`, a scheme gives what the diffrax
    solver returns once the window has converged (`outputs`: dense information and,
    where the scheme has one, its own error estimate), and copies of itself on coarser
    grids (`coarsen`) for the coarse-grid predictor.

    Every scheme is defined by the same window, so the window is held here, once: the
    term, its `args`, the window's ends `t0`, `t1`, the flat initial state `y0` and its
    `flattener`, the number of grid points and the Jacobian structure of the Newton
    linearisation. Subclasses add what their scheme needs (e.g. a Runge--Kutta solver).
    """

    terms: AbstractTerm
    args: PyTree
    t0: Real[Array, ""]
    t1: Real[Array, ""]
    y0: Float[Array, " D"]
    flattener: TreeFlattener
    num_points: int = eqx.field(static=True)
    jacobian: Literal["dense", "diagonal"] = eqx.field(static=True)

    @property
    def init(self) -> Float[Array, " D"]:
        return self.y0

    @property
    def ts(self) -> Real[Array, " N"]:
        return uniform_grid(self.t0, self.t1, self.num_points)

    @property
    @abc.abstractmethod
    def order(self) -> int:
        """Order of convergence of the grid values in the grid spacing."""

    @property
    @abc.abstractmethod
    def interpolation_cls(self) -> Callable[..., AbstractLocalInterpolation]:
        """Called as `interpolation_cls(t0=t0, t1=t1, **dense_info)` (diffrax's
        convention) with the `dense_info` of `outputs`."""

    @abc.abstractmethod
    def outputs(
        self, ys_full: Float[Array, "N D"]
    ) -> tuple[dict[str, PyTree[Array]], Float[Array, " D"]]:
        """From the converged grid values (`y0` included): the window's `dense_info`
        (a dict of fixed-shape arrays) and the estimate of the error the window adds
        (flat, componentwise; see `defect_error`)."""

    def slope(self, t, y: Float[Array, " D"]) -> Float[Array, " D"]:
        """$f(t, y)$ in the solver's time (flat), through `vf_prod` so that diffrax's
        time-direction wrapping is respected."""
        unit = self.terms.contr(0, 1)
        out = self.terms.vf_prod(t, self.flattener.unravel(y), self.args, unit)
        return self.flattener.ravel(out)

    def slopes(self, ys_full: Float[Array, "N D"]) -> Float[Array, "N D"]:
        """$f(t_k, y_k)$ at every grid point."""
        return jax.vmap(self.slope)(self.ts, ys_full)

    def defect_error(
        self, ys_full: Float[Array, "N D"], fs: Float[Array, "N D"]
    ) -> Float[Array, " D"]:
        r"""Error estimate of the window from its grid values alone (any scheme of
        order $p \ge 1$; it does not depend on how the grid values were found).

        On each interval the cubic Hermite interpolant $u$ of $(y_k, f_k, y_{k+1},
        f_{k+1})$ has defect $\delta = u' - f(t, u)$, zero at both ends. The exact
        flow from $y_k$ differs from $u$ at $t_{k+1}$ by $-\int \delta$ to leading
        order, so Simpson's rule (exact on the nodes, where $\delta = 0$) estimates
        the interval's local error as

        $$e_k = y_{k+1} - y_k - \tfrac{\Delta}{6}\big(f_k + 4 f(t_{k+1/2},
        u_{k+1/2}) + f_{k+1}\big), \quad u_{k+1/2} = \tfrac12 (y_k + y_{k+1})
        + \tfrac{\Delta}{8} (f_k - f_{k+1}),$$

        which is the true local error $O(\Delta^{p+1})$ up to $O(\Delta^{p+2})$
        (the interpolant is $O(\Delta^{p+1})$ from the exact local solution and
        Simpson's rule is 4th order). The window's estimate is $\sum_k |e_k|$,
        componentwise: with $N$ points fixed, of order $p + 1$ in the window length.
        Costs one batched evaluation of $f$ at the interval midpoints."""
        ts = self.ts
        delta = (ts[1:] - ts[:-1])[:, None]
        ya, yb, fa, fb = ys_full[:-1], ys_full[1:], fs[:-1], fs[1:]
        mid = (ya + yb) / 2 + delta * (fa - fb) / 8
        fm = jax.vmap(self.slope)((ts[:-1] + ts[1:]) / 2, mid)
        local = yb - ya - delta * (fa + 4 * fm + fb) / 6
        return jnp.sum(jnp.abs(local), axis=0)

    def coarsen(self, num_points: int) -> "AbstractWindowScheme":
        """The same scheme over the same window on a grid of `num_points` points."""
        return dataclasses.replace(self, num_points=num_points)


class ExponentialScheme(AbstractWindowScheme):
    """The DEER paper's exponential-trapezoid scheme over one window (see module doc).
    Dense output: cubic Hermite from the grid values and slopes; error estimate:
    `defect_error`."""

    time_sharding: TimeSharding | None = eqx.field(static=True, default=None)  # pyright: ignore[reportIncompatibleMethodOverride] (a field for the base's property)
    exact_jacobian: ClassVar[bool] = False
    explicit_recurrence: ClassVar[bool] = False

    @property
    def interpolation_cls(self) -> Callable[..., AbstractLocalInterpolation]:
        return HermiteGridInterpolation

    @property
    def order(self) -> int:
        return 2

    def _increment(self, t, y: Float[Array, " D"]) -> Float[Array, " D"]:
        # Delta * f(t, y), through `vf_prod` so that diffrax's time-direction wrapping
        # and the term's own control are respected.
        control = (self.terms.contr(self.t0, self.t1) ** ω / (self.num_points - 1)).ω
        out = self.terms.vf_prod(t, self.flattener.unravel(y), self.args, control)
        return self.flattener.ravel(out)

    def outputs(self, ys_full):
        unravel = self.flattener.unravel_stacked
        fs = self.slopes(ys_full)
        dense_info = dict(ts=self.ts, ys=unravel(ys_full), fs=unravel(fs))
        return dense_info, self.defect_error(ys_full, fs)

    def _interval_averages(self, ys, jacobians=None):
        r"""$(\bar J_k, \bar h_k)$ of every interval (see the module doc); with the
        vector field's Jacobians `jacobians` (at the grid points, `y0` included) taken
        as given instead of evaluated at `ys`."""
        ys_full = jnp.concatenate([self.y0[None], ys])
        if jacobians is None:
            F, J = value_and_jacobian(
                self._increment, self.ts, ys_full, self.jacobian, self.time_sharding
            )
        else:
            F, J = jax.vmap(self._increment)(self.ts, ys_full), jacobians
        h = F - matvec(J, ys_full)
        X = (J[:-1] + J[1:]) / 2
        z = (h[:-1] + h[1:]) / 2
        # Materialise the interval averages: otherwise XLA may fuse (and so repeat) the
        # vector field's Jacobian into every use inside the exponential (measured 1.7x
        # slower on CPU for a 3-D problem).
        return lax.optimization_barrier((X, z))

    def linearise(self, ys):
        X, z = self._interval_averages(ys)
        if self.jacobian == "dense":
            return expm_phi1(X, z)
        return exp_phi1_diagonal(X, z)

    def linearise_with_residual(self, ys):
        r"""The transitions, offsets and residual from one evaluation of the vector
        field's Jacobians, the residual as $(y_k - y_{k-1}) - ((e^{\bar J_{k-1}} - I)
        y_{k-1} + \varphi_1(\bar J_{k-1}) \bar h_{k-1})$: differences of nearby
        states and small increments, accurate relative to the step rather than to the
        states (float32, Van der Pol, T = 1e4: the converged trajectory's error 4.3e-4
        with the residual read off $e^{\bar J}$, 1.0e-6 with this one; diffrax's Heun
        on the same grid: 3.9e-6)."""
        X, z = self._interval_averages(ys)
        if self.jacobian == "dense":
            E1, b = expm1_phi1(X, z)
            A = E1 + identity_like(X)
        else:
            (A, b), E1 = exp_phi1_diagonal(X, z), jnp.expm1(X)
        return A, b, self._increment_residual(E1, b, ys)

    def _increment_residual(self, E1, b, ys):
        r"""$(y_k - y_{k-1}) - ((e^{\bar J_{k-1}} - I) y_{k-1} + b_k)$ from
        `E1` $= e^{\bar J} - I$ (dense or diagonal) and the offsets `b`."""
        prev = previous_states(self.y0, ys)
        return (ys - prev) - (matvec(E1, prev) + b)

    def residual(self, ys):
        r"""$r_k = y_k - e^{\bar J_{k-1}} y_{k-1} - \varphi_1(\bar J_{k-1})\,
        \bar h_{k-1}$. With dense Jacobians by `expm_action`, whose derivatives (the
        implicit derivative's products) take matrix-vector products only (measured, CPU,
        py3.11: the reverse-mode implicit derivative of the neural ODE at T = 1e4,
        D = 4, 30.8 -> 26.4 ms; training gradient D = 16, T = 1e3, 10-20% faster)."""
        X, z = self._interval_averages(ys)
        return self._residual(X, z, ys)

    def residual_and_transitions(self, ys):
        r"""The residual and the transitions $e^{\bar J_{k-1}}$ from one evaluation of
        the vector field's Jacobians (measured, CPU, py3.11: forward-mode gradients
        2-15% faster than from two, e.g. the neural ODE at T = 1e4, D = 4, 93 -> 79 ms;
        no faster in reverse mode, where it is not used)."""
        X, z = self._interval_averages(ys)
        X_fixed = lax.stop_gradient(X)
        transitions = expm(X_fixed) if self.jacobian == "dense" else jnp.exp(X_fixed)
        return self._residual(X, z, ys), transitions

    def first_order_residual(self, about):
        r"""With dense Jacobians: the residual with the vector field's Jacobians $J_k$
        held at their values on the trajectory `about` (see
        `AbstractTrajectoryProblem.first_order_residual`). Its derivative in $y$ at
        `about` is exactly the linear recurrence $y_k - e^{\bar J_{k-1}} y_{k-1}$ of
        the linearisation, since $\partial \bar h_{k-1} / \partial y_k = \tfrac12
        (J_k - J_k) = 0$ once $J$ is fixed; what it leaves out is the derivative
        through $J$, a second derivative of the vector field (on CPU about 7x the cost
        of $J$ itself)."""
        if self.jacobian != "dense":
            return None
        about_full = lax.stop_gradient(jnp.concatenate([self.y0[None], about]))

        def residual(ys, problem):
            # (`self`'s Jacobians: not differentiated with respect to `problem`.)
            _, J = value_and_jacobian(
                self._increment, self.ts, about_full, "dense", self.time_sharding
            )
            X, z = problem._interval_averages(ys, lax.stop_gradient(J))
            # (`X` depends on the held Jacobians only. Without `stop_gradient` the
            # optimisation barrier of `_interval_averages`, which `z` passes too, gives
            # it a zero tangent that the exponential's transpose would pull back, through
            # the Fréchet derivative where matrices need squaring.)
            return problem._residual(lax.stop_gradient(X), z, ys)

        return residual

    def _residual(self, X, z, ys):
        if self.jacobian == "dense":
            return ys - expm_action(X, z, previous_states(self.y0, ys))
        return self._increment_residual(jnp.expm1(X), exp_phi1_diagonal(X, z)[1], ys)


class AbstractDiscretisation(eqx.Module):
    """The scheme `DEER` solves on each window's grid: the option
    `DEER(discretisation=...)`. It makes a window's trajectory problem (`window`) and
    tells diffrax the order of its values and error estimate and the class of its dense
    output, which `DEER` forwards as its own."""

    @abc.abstractmethod
    def window(
        self,
        *,
        terms: AbstractTerm,
        args: PyTree,
        t0: Real[Array, ""],
        t1: Real[Array, ""],
        y0: Float[Array, " D"],
        flattener: TreeFlattener,
        num_points: int,
        jacobian: Literal["dense", "diagonal"],
        time_sharding: TimeSharding | None,
    ) -> AbstractWindowScheme:
        """The scheme over one window of `num_points` grid points from `t0` to `t1`,
        its time axis sharded by `time_sharding` (None: one device)."""

    @abc.abstractmethod
    def order(self, terms) -> int:
        """Order of the grid values in the grid spacing."""

    @abc.abstractmethod
    def error_order(self, terms) -> int:
        """Order of a window's error estimate in the window length."""

    @property
    @abc.abstractmethod
    def interpolation_cls(self) -> Callable[..., AbstractLocalInterpolation]:
        """The dense output of a window (diffrax's `interpolation_cls`)."""


class ExponentialTrapezoid(AbstractDiscretisation):
    r"""The DEER paper's exponential-trapezoid scheme (the default discretisation; see
    the module doc): 2nd order, cubic Hermite dense output, and the defect error
    estimate (`AbstractWindowScheme.defect_error`), of order 3 in the window length
    (the sum over a fixed number of intervals of local errors $O(\Delta^3)$).

    !!! example

        ```python
        diffrax_deer.DEER(discretisation=diffrax_deer.ExponentialTrapezoid())  # == DEER()
        ```
    """

    @property
    def interpolation_cls(self) -> Callable[..., AbstractLocalInterpolation]:
        return HermiteGridInterpolation

    def window(self, **kwargs) -> "ExponentialScheme":
        return ExponentialScheme(**kwargs)

    def order(self, terms) -> int:
        return 2

    def error_order(self, terms) -> int:
        return 3
