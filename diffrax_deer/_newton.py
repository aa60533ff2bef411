r"""The parallel Newton iteration over a whole trajectory, and its implicit derivative.

A trajectory $y_1, \dots, y_T$ (flattened states, shape `(T, D)`) is the root of the
residual $r_k(y) = y_k - \Phi_k(y)$, where $\Phi_k$ depends only on $y_{k-1}$ and $y_k$
(with $y_0$ the given initial state). A *problem* (a subclass of
`AbstractTrajectoryProblem`) supplies a linearisation of $\Phi$ about any trajectory,

$$\Phi_k(y) \approx A_k y_{k-1} + b_k,$$

and one Newton iteration solves that linear recurrence for all $k$ at once with the
parallel scan of [`diffrax_deer.linear_recurrence`][]. Full Jacobians $A_k$ give DEER,
diagonal ones quasi-DEER.

The iteration stops when the update is small in the optimistix sense,
$\| (y^{(i+1)} - y^{(i)}) / (\text{atol} + \text{rtol}\, |y^{(i+1)}|) \| \le 1$; for
Newton's method the last update also bounds the error of the previous iterate, and the
returned iterate is better still.

Gradients never go through the iterations: at the converged trajectory the implicit
function theorem gives $\mathrm{d}y = -(\partial r/\partial y)^{-1} \partial r/\partial
\theta\, \mathrm{d}\theta$, a block-bidiagonal solve with the same scan (transposed,
i.e. run backwards, in reverse mode): see `_implicit.py`. Memory and time do not grow
with the number of iterations, and forward and reverse mode are both supported.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int

from ._batched import matvec
from ._implicit import implicit_tangent, refinement_tolerance
from ._kalman import damped_recurrence
from ._linear_recurrence import linear_recurrence
from ._lyapunov import lyapunov_exponent


class AbstractTrajectoryProblem(eqx.Module):
    """A trajectory defined by $y_k = \\Phi_k(y_{k-1}, y_k)$, $k = 1..T$, as seen by
    the Newton layer. Every floating-point array held by the problem (initial state,
    parameters, times, ...) is differentiated through by the implicit function theorem.
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

    def residual(self, ys: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """$r_k = y_k - \\Phi_k(y)$. The default reads $\\Phi$ off the linearisation."""
        A, b = self.linearise(ys)
        return ys - (matvec(A, previous_states(self.init, ys)) + b)


class NewtonStats(eqx.Module):
    """Diagnostics of one parallel Newton solve.

    - `num_iters`: Newton iterations taken.
    - `update_norm`: size of the last update in units of the tolerance
      (`<= 1` means converged; it estimates the error of the previous iterate).
    - `result`: an `optimistix.RESULTS`.
    - `num_rejected`: trust-region steps rejected (ELK only; 0 for DEER).
    - `lyapunov_exponent`: the largest Lyapunov exponent of the converged trajectory
      (see [`diffrax_deer.lyapunov_exponent`][]), per step for `scan` and per unit time
      for `DEER`; NaN unless asked for (`lyapunov=True`).
    """

    num_iters: Int[Array, ""]
    update_norm: Float[Array, ""]
    result: optx.RESULTS
    num_rejected: Int[Array, ""]
    lyapunov_exponent: Float[Array, ""]


def _scaled_norm(diff, ys, rtol, atol, norm):
    return norm(diff / (atol + rtol * jnp.abs(ys)))


def previous_states(init: Float[Array, " D"], ys: Float[Array, "T D"]) -> Float[Array, "T D"]:
    """$y_0, \\dots, y_{T-1}$: each state's predecessor, `init` first."""
    return jnp.concatenate([init[None], ys[:-1]])


def _final_stats(num_iters, scaled, converged, finite, num_rejected, dtype):
    result = optx.RESULTS.where(
        converged,
        optx.RESULTS.successful,
        optx.RESULTS.where(
            finite,
            optx.RESULTS.nonlinear_max_steps_reached,
            optx.RESULTS.nonlinear_divergence,
        ),
    )
    scaled = jnp.where(converged, scaled, jnp.maximum(scaled, 1 + jnp.finfo(dtype).eps))
    return NewtonStats(num_iters, scaled, result, num_rejected, jnp.array(jnp.nan, dtype))


def _exact_by_length(problem, num_iters, guess, finite):
    """For an explicit recurrence, `T` iterations (with a finite last iterate) have found
    the solution even if the last update was not below tolerance: chaotic maps amplify
    round-off in the last states so much that the update never settles."""
    if not problem.explicit_recurrence:
        return jnp.array(False)
    return finite & (num_iters >= guess.shape[0])


# Consecutive iterations with non-finite states after which an implicit scheme's Newton
# iteration is declared divergent (explicit recurrences keep going: see
# `AbstractTrajectoryProblem.explicit_recurrence`).
_DIVERGENCE_STREAK = 4


def _newton_loop(problem, guess, rtol, atol, norm, max_iters):
    init = problem.init
    # For an implicit scheme, states that overflow iteration after iteration mean the
    # iteration is diverging: stop early and say so instead of spinning to max_iters.
    streak_limit = max_iters + 1 if problem.explicit_recurrence else _DIVERGENCE_STREAK

    def cond(carry):
        i, _, _, done, _, streak = carry
        return (i < max_iters) & jnp.invert(done) & (streak < streak_limit)

    def body(carry):
        i, ys, _, _, _, streak = carry
        A, b = problem.linearise(ys)
        new = linear_recurrence(A, b, init)
        # Non-finite states (overflow, NaN) are reset to the previous iterate (or the
        # initial state). For recurrences this keeps the global-convergence property:
        # after i iterations the first i states are exact, and later states may be
        # reset to anything (Gonzalez et al., 2024, Prop. 1).
        finite_points = jnp.all(jnp.isfinite(new), axis=-1, keepdims=True)
        finite = jnp.all(finite_points)
        fallback = jnp.where(jnp.isfinite(ys), ys, init[None])
        new = jnp.where(finite_points, new, fallback)
        scaled = _scaled_norm(new - ys, new, rtol, atol, norm)
        converged = finite & (scaled <= 1)
        streak = jnp.where(finite, 0, streak + 1)
        return i + 1, new, scaled, converged, finite, streak

    dtype = guess.dtype
    carry = (
        jnp.array(0, jnp.int32),
        guess,
        jnp.array(jnp.inf, dtype),
        jnp.array(False),
        jnp.array(True),
        jnp.array(0, jnp.int32),
    )
    out = lax.while_loop(cond, body, carry)
    num_iters, ys, scaled, converged, finite, _ = out
    converged = converged | _exact_by_length(problem, num_iters, guess, finite)
    stats = _final_stats(
        num_iters, scaled, converged, finite, jnp.array(0, jnp.int32), dtype
    )
    return ys, stats


_MIN_DAMPING = 1e-12
_MAX_DAMPING = 1e12
_STALL_FACTOR = 1e6


def _trust_region_loop(problem, guess, rtol, atol, norm, max_iters, damping):
    r"""ELK: Levenberg--Marquardt steps (a parallel Kalman smoother, see `_kalman.py`)
    in a trust-region loop.

    A step is accepted when it reduces the residual sum of squares by at least a small
    fraction of what the linear model predicts (the classical trust-region test; the
    damping is adapted by that ratio), or when it reduces the *natural level*
    $\|\tilde L(y)^{-1} r(y)\|$, the size of the Newton (DEER) correction (Deuflhard's
    affine-invariant monotonicity test). The second test matters for the ODE schemes,
    whose linearisation is not the exact Jacobian of their residual: near the solution
    the residual's predicted decrease can drown in the Jacobian's error and stall a
    purely residual-based trust region, while the Newton correction still shrinks.
    When neither test can be passed however strongly the step is damped (the damping
    has grown by `_STALL_FACTOR`: an inexact linearisation far from the solution, where
    its damped direction is not a descent direction), the loop takes one undamped
    Newton step (non-finite states reset as in DEER) and restarts the damping. So ELK
    never stalls where DEER would converge, and keeps its damping where DEER overflows.
    Converged when the Newton correction from the current iterate is within tolerance;
    that Newton step is returned, so the answer is DEER's."""
    init = problem.init
    dtype = guess.dtype

    def linearise(ys):
        A, b = problem.linearise(ys)
        r = ys - (matvec(A, previous_states(init, ys)) + b)
        return A, b, linear_recurrence(A, b, init), jnp.sum(r**2)

    def level(newton, ys, weight):
        return jnp.sum((weight * (newton - ys)) ** 2)

    def cond(carry):
        i, _, _, _, _, _, _, _, converged, _ = carry
        return (i < max_iters) & jnp.invert(converged)

    def body(carry):
        i, ys, A, b, newton, rsq, lam, _, _, num_rejected = carry
        newton_scaled = _scaled_norm(newton - ys, newton, rtol, atol, norm)
        converged = jnp.all(jnp.isfinite(newton)) & (newton_scaled <= 1)
        stalled = lam >= stall_damping
        damped = damped_recurrence(A, b, init, ys, lam)
        finite_points = jnp.all(jnp.isfinite(newton), axis=-1, keepdims=True)
        step = jnp.where(stalled, jnp.where(finite_points, newton, ys), damped)
        r_model = step - (matvec(A, previous_states(init, step)) + b)
        predicted = rsq - jnp.sum(r_model**2)
        A1, b1, newton1, rsq1 = linearise(step)
        ratio = (rsq - rsq1) / predicted
        weight = 1 / (atol + rtol * jnp.abs(ys))
        natural = level(newton1, step, weight) < (1 - 1e-4) * level(newton, ys, weight)
        ok = jnp.isfinite(rsq1) & jnp.all(jnp.isfinite(newton1))
        ratio = jnp.where(ok & (predicted > 0), ratio, -jnp.inf)
        accept = ok & ((ratio > 1e-4) | natural | stalled) & jnp.invert(converged)
        grow = (ratio > 0.75) | (natural & (ratio <= 1e-4))
        lam = jnp.where(accept & grow, lam / 3, jnp.where(ratio < 0.25, 4 * lam, lam))
        lam = jnp.where(stalled, initial_damping, lam)
        lam = jnp.clip(lam, _MIN_DAMPING, _MAX_DAMPING)
        keep = lambda new, old: jnp.where(accept, new, old)
        ys_next = jnp.where(converged, newton, keep(step, ys))
        scaled = jnp.where(converged, newton_scaled, jnp.inf)
        num_rejected = num_rejected + jnp.invert(accept | converged).astype(jnp.int32)
        return (
            i + 1, ys_next, keep(A1, A), keep(b1, b), keep(newton1, newton),
            keep(rsq1, rsq), lam, scaled, converged, num_rejected,
        )

    initial_damping = jnp.asarray(damping, dtype)
    stall_damping = jnp.minimum(initial_damping * _STALL_FACTOR, _MAX_DAMPING)
    carry = (
        jnp.array(0, jnp.int32),
        guess,
        *linearise(guess),
        initial_damping,
        jnp.array(jnp.inf, dtype),
        jnp.array(False),
        jnp.array(0, jnp.int32),
    )
    out = lax.while_loop(cond, body, carry)
    num_iters, ys, _, _, _, rsq, _, scaled, converged, num_rejected = out
    finite = jnp.isfinite(rsq)
    stats = _final_stats(num_iters, scaled, converged, finite, num_rejected, dtype)
    return ys, stats


def newton_iterations(
    problem: AbstractTrajectoryProblem,
    guess: Float[Array, "T D"],
    *,
    rtol: float,
    atol: float,
    norm: Callable,
    max_iters: int,
    damping: float | None = None,
) -> tuple[Float[Array, "T D"], NewtonStats]:
    """Runs the iteration from `guess` (no autodiff; see `solve_trajectory`):
    undamped Newton (DEER / quasi-DEER) when `damping` is None, else trust-region
    Levenberg--Marquardt steps (ELK / quasi-ELK) starting from that damping."""
    if damping is None:
        return _newton_loop(problem, guess, rtol, atol, norm, max_iters)
    return _trust_region_loop(problem, guess, rtol, atol, norm, max_iters, damping)


@eqx.filter_custom_jvp
def _solve(problem, guess, *, rtol, atol, norm, max_iters, damping):
    return newton_iterations(
        problem, guess, rtol=rtol, atol=atol, norm=norm, max_iters=max_iters,
        damping=damping,
    )


@_solve.def_jvp
def _solve_jvp(primals, tangents, *, rtol, atol, norm, max_iters, damping):
    problem, guess = primals
    t_problem, _ = tangents
    ys, stats = _solve(
        problem, guess, rtol=rtol, atol=atol, norm=norm, max_iters=max_iters,
        damping=damping,
    )
    t_stats = jtu.tree_map(lambda _: None, stats)
    # A window that failed has no derivative, and a caller (an adaptive controller
    # rejecting it) discards its values: its tangent is zero, computed at a harmless
    # point (the initial state repeated) so that nothing non-finite, and no linear
    # solve that cannot converge, reaches the gradient.
    ok = is_successful(stats) & jnp.all(jnp.isfinite(ys))
    ys_at = jnp.where(ok, ys, jnp.broadcast_to(problem.init, ys.shape))
    t_ys = implicit_tangent(
        ys_at, ok, problem, t_problem, rtol=refinement_tolerance(ys.dtype, rtol),
        # Diagonal transitions of an explicit recurrence need at most T refinements.
        max_steps=max(max_iters, ys.shape[0] + 1),
    )
    return (ys, stats), (t_ys, t_stats)


def solve_trajectory(
    problem: AbstractTrajectoryProblem,
    guess: Float[Array, "T D"],
    *,
    rtol: float,
    atol: float,
    norm: Callable = optx.max_norm,
    max_iters: int = 100,
    damping: float | None = None,
) -> tuple[Float[Array, "T D"], NewtonStats]:
    """Solves for the trajectory of `problem` by parallel Newton iterations from `guess`
    (trust-region ELK iterations if `damping` is given), differentiable (forward and
    reverse mode) with respect to every array in `problem` by the implicit function
    theorem. `guess` is not differentiated."""
    guess = lax.stop_gradient(guess)
    return _solve(
        problem, guess, rtol=rtol, atol=atol, norm=norm, max_iters=max_iters,
        damping=damping,
    )


def with_lyapunov_exponent(
    stats: NewtonStats, problem: AbstractTrajectoryProblem, ys: Float[Array, "T D"], dt
) -> NewtonStats:
    """`stats` with the Lyapunov exponent of the trajectory `ys` filled in, from the
    transitions of the linearisation about it (one extra linearisation and one scan;
    not differentiated). `dt` is the time one step spans (1 for per step)."""
    transitions, _ = problem.linearise(lax.stop_gradient(ys))
    exponent = lyapunov_exponent(lax.stop_gradient(transitions), lax.stop_gradient(dt))
    return eqx.tree_at(lambda s: s.lyapunov_exponent, stats, exponent.astype(ys.dtype))


def is_successful(stats: NewtonStats) -> Bool[Array, ""]:
    return stats.result == optx.RESULTS.successful
