r"""Trajectory problems, the statistics of their Newton solves, and helpers.

A trajectory $y_1, \dots, y_T$ (flattened states, shape `(T, D)`) is the root of the
residual $r_k(y) = y_k - \Phi_k(y)$, where $\Phi_k$ depends only on $y_{k-1}$ and $y_k$
(with $y_0$ the given initial state). A *problem* (a subclass of
`AbstractTrajectoryProblem`) supplies a linearisation of $\Phi$ about any trajectory,

$$\Phi_k(y) \approx A_k y_{k-1} + b_k,$$

and one Newton iteration solves that linear recurrence for all $k$ at once with the
parallel scan of [`diffrax_deer.linear_recurrence`][]. Full Jacobians $A_k$ give DEER,
diagonal ones quasi-DEER. The iterations themselves are optimistix root finders
(`_root_finder.py`); their implicit derivative is in `_implicit.py`.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._batched import matvec
from ._lyapunov import sharded_lyapunov_exponent
from ._sharding import TimeSharding


class AbstractTrajectoryProblem(eqx.Module):
    """A trajectory defined by $y_k = \\Phi_k(y_{k-1}, y_k)$, $k = 1..T$ (flat states,
    shape `(T, D)`), the root of its `residual`; solved by passing it as `args` to
    `optimistix.root_find` with [`diffrax_deer.ParallelNewton`][] or
    [`diffrax_deer.ELK`][]. Every floating-point array held by the problem (initial
    state, parameters, times, ...) is differentiated by the implicit function theorem
    ([`diffrax_deer.ImplicitTrajectoryAdjoint`][]).

    Subclasses give `init` ($y_0$), `linearise` (the linear recurrence whose solution is
    the next Newton iterate), and two flags: `exact_jacobian`, whether that
    linearisation is the exact Jacobian of `residual` (then the implicit derivative is
    one scan), and `explicit_recurrence`, whether $\\Phi_k$ depends on $y_{k-1}$ only
    (then $T$ Newton steps reach the solution from any guess). They may override
    `residual` (by default read off the linearisation) and `residual_and_transitions`
    (what forward-mode implicit differentiation evaluates at the solution) where those
    are cheaper to compute directly. For explicit recurrences see
    [`diffrax_deer.AbstractExplicitRecurrence`][].
    """

    @property
    @abc.abstractmethod
    def init(self) -> Float[Array, " D"]:
        """The initial state $y_0$, flattened."""

    @abc.abstractmethod
    def linearise(
        self, ys: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T D D"] | Float[Array, "T D"], Float[Array, "T D"]]:
        """Transitions `A` (dense `(T, D, D)` or diagonal `(T, D)`) and offsets `b` of
        the linear recurrence whose solution is the next Newton iterate."""

    # Whether `linearise` gives the exact Jacobian of `residual` (true for DEER on a
    # recurrence); then implicit differentiation needs one scan and nothing more.
    exact_jacobian: eqx.AbstractVar[bool]
    # Whether Phi_k depends on y_{k-1} only (an explicit recurrence, as opposed to an
    # implicit scheme whose Phi_k also depends on y_k). Then after i iterations the
    # first i states are exact whatever the transitions A_k (Gonzalez et al., 2024,
    # Prop. 1), so T iterations always reach the solution.
    explicit_recurrence: eqx.AbstractVar[bool]

    @property
    def time_sharding(self) -> TimeSharding | None:
        """How the trajectory's time axis is sharded across devices (see
        `_sharding.py`); None (this default): one device. Problems that support
        sharding have it as a field."""
        return None

    def shard(self, tree: PyTree[Array]) -> PyTree[Array]:
        """`tree`'s (time-major) arrays constrained to the problem's sharding along
        time, if any."""
        sharding = self.time_sharding
        return tree if sharding is None else sharding.constrain(tree)

    def residual(self, ys: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """$r_k = y_k - \\Phi_k(y)$. The default reads $\\Phi$ off the linearisation."""
        A, b = self.linearise(ys)
        return model_residual(A, b, self.init, ys)

    def linearise_with_residual(self, ys: Float[Array, "T D"]) -> tuple[
        Float[Array, "T D D"] | Float[Array, "T D"], Float[Array, "T D"], Float[Array, "T D"]
    ]:
        """`linearise(ys)` and the residual at `ys` from the same evaluation: what a
        Newton step solved for the correction needs (not differentiated). This default
        reads the residual off the linearisation; a problem whose transitions are near
        the identity gives it in a form that keeps the small increments' relative
        accuracy (the exponential scheme)."""
        A, b = self.linearise(ys)
        return A, b, model_residual(A, b, self.init, ys)

    def first_order_residual(
        self, about: Float[Array, "T D"]
    ) -> Callable[[Float[Array, "T D"], "AbstractTrajectoryProblem"], Float[Array, "T D"]] | None:
        """Optionally, a function `(ys, problem) -> residual` that agrees with
        `problem.residual(ys)` at `ys = about` but holds fixed (not differentiated)
        whatever of the trajectory the linearisation's transitions are made from, so
        that its derivative with respect to `ys` at `about` is exactly the
        linearisation's recurrence $y_k - A_k y_{k-1}$. The residual's derivative less
        this one's is then the part a Newton linearisation leaves out, and the implicit
        derivative's refinement needs it once instead of at every step (see
        `_implicit.py`). None (this default): no such split."""
        del about
        return None

    def residual_and_transitions(
        self, ys: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T D"], Float[Array, "T D D"] | Float[Array, "T D"]]:
        """The residual at `ys` and, not differentiated, the transitions of the
        linearisation there: what the implicit derivative needs at the converged
        trajectory (its exact products and its preconditioner). This default computes
        them apart; a problem whose residual is built from what its transitions are
        made from (the exponential scheme: the vector field's Jacobian) shares it."""
        transitions, _ = self.linearise(lax.stop_gradient(ys))
        return self.residual(ys), lax.stop_gradient(transitions)


class NewtonStats(eqx.Module):
    """Diagnostics of one parallel Newton solve.

    - `num_iters`: Newton iterations taken.
    - `update_norm`: size of the last update in units of the tolerance
      (`<= 1` means converged; it estimates the error of the previous iterate).
    - `result`: an `optimistix.RESULTS`.
    - `num_rejected`: steps rejected: ELK's trust-region rejections; for DEER on an
      ODE scheme, the steps whose sliding window had to be shortened (see
      [`diffrax_deer.ParallelNewton`][]; 0 on contractive problems).
    - `min_window`: the shortest sliding window used, in grid intervals (the whole
      trajectory, T, when it was never shortened, and for ELK and explicit
      recurrences).
    - `num_sequential`: states of an explicit recurrence evaluated one after another
      because the parallel iteration had not converged within its iterations (see
      [`diffrax_deer.ParallelNewton`][]'s `sequential_fallback`); 0 otherwise.
    - `lyapunov_exponent`: the largest Lyapunov exponent of the converged trajectory
      (see [`diffrax_deer.lyapunov_exponent`][]), per step for `scan` and per unit time
      for `DEER`; NaN unless asked for (`lyapunov=True`).
    """

    num_iters: Int[Array, ""]
    update_norm: Float[Array, ""]
    result: optx.RESULTS
    num_rejected: Int[Array, ""]
    lyapunov_exponent: Float[Array, ""]
    min_window: Int[Array, ""]
    num_sequential: Int[Array, ""]


def previous_states(init: Float[Array, " D"], ys: Float[Array, "T D"]) -> Float[Array, "T D"]:
    """$y_0, \\dots, y_{T-1}$: each state's predecessor, `init` first."""
    return jnp.concatenate([init[None], ys[:-1]])


def take_row(x: Float[Array, "T D"], i: Int[Array, ""]) -> Float[Array, " D"]:
    """`x[i]` for a traced `i`, as a masked sum: local work and one reduction of `D`
    numbers when the time axis is sharded over devices (an index would gather `x`)."""
    mask = (jnp.arange(x.shape[0]) == i)[:, None]
    return jnp.sum(jnp.where(mask, x, 0), axis=0)


def model_residual(A, b, init: Float[Array, " D"], ys: Float[Array, "T D"]) -> Float[Array, "T D"]:
    """The residual of `ys` in the linear model $y_k = A_k y_{k-1} + b_k$ (dense or
    diagonal `A`)."""
    return ys - (matvec(A, previous_states(init, ys)) + b)


def with_lyapunov_exponent(
    stats: NewtonStats, problem: AbstractTrajectoryProblem, ys: Float[Array, "T D"], dt
) -> NewtonStats:
    """`stats` with the Lyapunov exponent of the trajectory `ys` filled in, from the
    transitions of the linearisation about it (one extra linearisation and one scan;
    not differentiated). `dt` is the time one step spans (1 for per step)."""
    transitions, _ = problem.linearise(lax.stop_gradient(ys))
    exponent = sharded_lyapunov_exponent(
        lax.stop_gradient(transitions), lax.stop_gradient(dt), problem.time_sharding
    )
    return eqx.tree_at(lambda s: s.lyapunov_exponent, stats, exponent.astype(ys.dtype))


def is_successful(stats: NewtonStats) -> Bool[Array, ""]:
    return stats.result == optx.RESULTS.successful
