r"""The parallel Newton iteration (DEER, quasi-DEER) and its trust-region variant (ELK,
quasi-ELK), as optimistix root finders of a trajectory residual.

A trajectory $y_1, \dots, y_T$ is the root of $r(y) = 0$ (see `_newton.py`); both
root finders here are `optimistix.AbstractRootFinder`s driven by `optimistix.root_find`
like `optimistix.Newton`, with `fn(y, problem) = problem.residual(y)` and the
`AbstractTrajectoryProblem` as `args`. They never call `fn`: each step linearises the
problem about the current iterate, $y_k \approx A_k y_{k-1} + b_k$, and solves that
linear recurrence for all $k$ at once with the parallel scan of
[`diffrax_deer.linear_recurrence`][]. The iteration stops when its update is small in
the optimistix sense, $\| \delta / (\text{atol} + \text{rtol}\, |y|) \| \le 1$.

Gradients come from the implicit function theorem at the root, through
`ImplicitTrajectoryAdjoint` (see `_implicit.py`), never through the iterations.

!!! example

    ```python
    sol = optx.root_find(
        lambda ys, problem: problem.residual(ys), ParallelNewton(rtol=1e-8, atol=1e-8),
        guess, args=problem, adjoint=ImplicitTrajectoryAdjoint(), throw=False,
    )
    ```
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._implicit import completed_sequentially, ImplicitTrajectoryAdjoint
from ._kalman import damped_recurrence
from ._linear_recurrence import solve_linear_recurrence
from ._misc import default_tolerance
from ._newton import (
    AbstractTrajectoryProblem,
    model_residual,
    NewtonStats,
    take_row,
)


Jacobian = Literal["dense", "diagonal"]


# Failed steps (window shortenings, non-finite states) without progress after which an
# implicit scheme's Newton iteration is declared divergent (explicit recurrences keep
# going: see `AbstractTrajectoryProblem.explicit_recurrence`).
_DIVERGENCE_STREAK = 4
# How far beyond the scale of the converged states a window's state may go before the
# window is shortened (see `ParallelNewton`).
_GROWTH = 1e3


def _scaled_norm(diff, ys, finder):
    rtol, atol = finder._tolerances(ys.dtype)
    return finder.norm(diff / (atol + rtol * jnp.abs(ys)))


def _residual(ys, problem):
    return problem.residual(ys)


def _check_problem(problem: Any, aux_struct: PyTree) -> AbstractTrajectoryProblem:
    if not isinstance(problem, AbstractTrajectoryProblem):
        raise TypeError(
            "diffrax_deer's root finders solve trajectory problems: pass the "
            "`AbstractTrajectoryProblem` as `args` of `optimistix.root_find` (with "
            f"`fn(ys, problem) = problem.residual(ys)`); got args of type "
            f"{type(problem).__name__}."
        )
    if aux_struct is not None:
        raise ValueError("diffrax_deer's root finders do not support `has_aux=True`.")
    return problem


class AbstractTrajectoryRootFinder(optx.AbstractRootFinder):
    """A root finder of a trajectory residual that linearises the problem (`args`)
    itself; see the module doc. Subclasses' states have `step`, `update_norm`,
    `converged`, `finite` (whether the last linear solve was finite) and `streak`
    (consecutive non-finite solves)."""

    rtol: eqx.AbstractVar[float | None]
    atol: eqx.AbstractVar[float | None]
    norm: eqx.AbstractVar[Callable[[PyTree], Array]]
    jacobian: eqx.AbstractVar[Jacobian]
    # Whether T steps solve an explicit recurrence exactly whatever their linearisation
    # (true of undamped Newton steps; Gonzalez et al., 2024, Prop. 1).
    exact_after_length: eqx.AbstractClassVar[bool]
    # The name of the method in the papers' (and the `method=` shorthand's) terms.
    name: eqx.AbstractClassVar[str]

    def __check_init__(self):
        for what in ("rtol", "atol"):
            value = getattr(self, what)
            if value is not None and not value > 0:
                raise ValueError(f"`{what}` must be positive; got {value}.")
        if self.jacobian not in ("dense", "diagonal"):
            raise ValueError(
                f"`jacobian` must be 'dense' or 'diagonal'; got {self.jacobian!r}."
            )

    @property
    def method(self) -> str:
        """`"deer"`, `"quasi-deer"`, `"elk"` or `"quasi-elk"`."""
        return self.name if self.jacobian == "dense" else f"quasi-{self.name}"

    def with_default_tolerances(self, dtype) -> "AbstractTrajectoryRootFinder":
        """A copy whose unset `rtol` / `atol` are the default for `dtype` (1e-8 in
        float64, about 2e-5 in float32)."""
        rtol, atol = self._tolerances(dtype)
        return dataclasses.replace(self, rtol=rtol, atol=atol)

    def _tolerances(self, dtype) -> tuple[float, float]:
        default = default_tolerance(dtype)
        rtol = default if self.rtol is None else self.rtol
        atol = default if self.atol is None else self.atol
        return rtol, atol

    def terminate(self, fn, y, args, options, state, tags):
        del fn, options, tags
        # An explicit recurrence is solved exactly by T iterations (with a finite last
        # iterate), even if the last update was not below tolerance: chaotic maps
        # amplify round-off in the last states so much that it never settles.
        exact = jnp.array(False)
        limit = _DIVERGENCE_STREAK
        if args.explicit_recurrence:
            limit = jnp.iinfo(jnp.int32).max
            if self.exact_after_length:
                exact = state.finite & (state.step >= y.shape[0])
        done = state.converged | exact
        diverged = jnp.invert(done) & (state.streak >= limit)
        result = optx.RESULTS.where(
            diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        return done | diverged, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}


def _reset_non_finite(new, ys, init):
    """`new` with non-finite states reset to the previous iterate (or the initial
    state). For recurrences this keeps the global-convergence property: after i
    iterations the first i states are exact, and later states may be reset to anything
    (Gonzalez et al., 2024, Prop. 1)."""
    finite_points = jnp.all(jnp.isfinite(new), axis=-1, keepdims=True)
    fallback = jnp.where(jnp.isfinite(ys), ys, init[None])
    return jnp.where(finite_points, new, fallback), jnp.all(finite_points)


class _NewtonState(eqx.Module):
    step: Int[Array, ""]
    update_norm: Float[Array, ""]
    converged: Bool[Array, ""]
    finite: Bool[Array, ""]
    streak: Int[Array, ""]
    num_rejected: Int[Array, ""]  # steps whose window had to be shortened
    start: Int[Array, ""]  # the first state whose last update was not small
    window: Int[Array, ""]  # states from `start` that the next step updates
    min_window: Int[Array, ""]  # the shortest window so far
    guess_size: Float[Array, " T"]  # the initial iterate's size at each state


def _windowed_update(
    full: Float[Array, "T D"], y: Float[Array, "T D"], init: Float[Array, " D"],
    state: _NewtonState,
) -> tuple[Float[Array, "T D"], Bool[Array, ""], Int[Array, ""], Int[Array, ""]]:
    """The next iterate of an implicit scheme from the Newton solution `full` of its
    linearisation at `y`, updated only on the states before the window's end: the new
    iterate, whether the window was kept (all its states trusted), its end, and the
    next window's length.

    A state of the window is trusted if it is finite and within `_GROWTH` times the
    scale of the states before the window, of the initial state and of the initial
    guess there (a good guess, such as the coarse-grid predictor's, vouches for large
    values); the window's first state only needs to be finite (its predecessor's
    update was small). An untrusted state shortens the window to half the stretch
    before it; a kept window doubles. The states after the window hold its last state
    (a constant guess from there)."""
    T = y.shape[0]
    index = jnp.arange(T, dtype=jnp.int32)
    end = jnp.minimum(state.start + state.window, T)
    size = jnp.max(jnp.abs(full), axis=-1)
    before = jnp.where(index < state.start, jnp.max(jnp.abs(y), axis=-1), 0)
    scale = jnp.maximum(jnp.maximum(jnp.max(jnp.abs(init)), jnp.max(before)), state.guess_size)
    trusted = jnp.isfinite(size) & ((size <= _GROWTH * (1 + scale)) | (index == state.start))
    in_window = (index >= state.start) & (index < end)
    first_bad = jnp.min(jnp.where(in_window & jnp.invert(trusted), index, T))
    kept = first_bad >= T
    window = jnp.where(
        kept, jnp.minimum(2 * state.window, T), jnp.maximum((first_bad - state.start) // 2, 1)
    )
    end = jnp.where(kept, end, jnp.minimum(state.start + window, T))
    updated = (index < end)[:, None]
    new = jnp.where(updated & jnp.isfinite(full), full, y)
    new = jnp.where(updated, new, take_row(new, jnp.maximum(end - 1, 0)))
    return new, kept, end, window


class ParallelNewton(AbstractTrajectoryRootFinder):
    r"""Newton's method on a whole trajectory (DEER; quasi-DEER when the problem
    linearises with diagonal transitions): each step one linearisation of the problem
    and one parallel scan of the resulting linear recurrence.

    **Arguments:**

    - `rtol`, `atol`: the step is accepted as converged when its update $\delta$
      satisfies $\|\delta / (\text{atol} + \text{rtol}\,|y|)\| \le 1$. Default
      (None): 1e-8 in float64, about 2e-5 in float32.
    - `norm`: as in optimistix (default `optimistix.max_norm`).
    - `jacobian`: `"dense"` (default: DEER, the full Jacobian, quadratic convergence,
      $O(TD^2)$ memory) or `"diagonal"` (quasi-DEER: its diagonal, $O(TD)$ memory,
      linear convergence). Used by [`diffrax_deer.DEER`][] and
      [`diffrax_deer.scan`][] to build the problem; a problem passed to
      `optimistix.root_find` directly linearises as it was built.

    **Sliding window (implicit schemes, i.e. the ODE discretisations).** Far from the
    solution, one linearisation of a whole window of oscillating, stiff or chaotic
    dynamics can overshoot without bound. Each step therefore updates the states up to
    the end of a *window* $[s, s + W)$, where $s$ is the first state whose last update
    was not small: states before $s$ have converged, and since the residual is causal
    (block lower-bidiagonal), a window's Newton step does not depend on what follows
    it. $W$ starts at the whole trajectory. If the step leaves a state of the window
    non-finite or beyond $10^3$ times the scale of the converged states (and of the
    initial guess at that state: a good guess vouches for large values), $W$ becomes
    half the stretch before it, and that part of the step is kept; a kept window
    doubles. States after the window hold its last state. On contractive problems the
    window never shortens, and the iteration is plain DEER; otherwise it slides along
    the trajectory and grows back once past the hard stretch. Converged once the
    window covers the trajectory and the update is within tolerance: the answer is the
    root of the whole residual, as without windows (and so is its derivative). Where
    the window cannot get past a state (no root nearby: a finite-time blow-up) after
    being shortened 4 times, the iteration stops as `nonlinear_divergence`.

    **Explicit recurrences** (`diffrax_deer.scan`, Runge--Kutta maps) take
    whole-trajectory steps, with non-finite states reset to the previous iterate: after
    $i$ steps the first $i$ states are exact (Gonzalez et al., 2024), so $T$ steps
    always suffice. With `sequential_fallback=True` (default), an iteration that has not
    converged when the root find runs out of steps evaluates the rest of the trajectory
    one state after another, from the first state whose last update was not small: the
    answer is exact (as `jax.lax.scan`'s) and reported successful, with the number of
    states so evaluated in `NewtonStats.num_sequential`. Its work is bounded: `max_iters`
    parallel steps plus at most $T$ sequential ones. `sequential_fallback=False`
    reports `nonlinear_max_steps_reached` instead.

    !!! example

        ```python
        diffrax_deer.DEER(root_finder=diffrax_deer.ParallelNewton(rtol=1e-10, atol=1e-10))
        diffrax_deer.scan(step, h0, xs, root_finder=diffrax_deer.ParallelNewton(jacobian="diagonal"))
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Array] = optx.max_norm
    jacobian: Jacobian = eqx.field(static=True, default="dense")
    sequential_fallback: bool = eqx.field(static=True, default=True)
    exact_after_length: ClassVar[bool] = True
    name: ClassVar[str] = "deer"

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, options, f_struct, tags
        _check_problem(args, aux_struct)
        zero = jnp.array(0, jnp.int32)
        inf = jnp.array(jnp.inf, y.dtype)
        T = jnp.array(y.shape[0], jnp.int32)
        guess_size = jnp.max(jnp.where(jnp.isfinite(y), jnp.abs(y), 0), axis=-1)
        return _NewtonState(
            zero, inf, jnp.array(False), jnp.array(True), zero, zero, zero, T, T, guess_size
        )

    def step(self, fn, y, args, options, state, tags):
        del fn, options, tags
        T = y.shape[0]
        y = args.shard(y)
        # Near the solution, the Newton step is solved for the correction: its
        # right-hand side is the residual, computed point by point in a form accurate
        # relative to each step (`linearise_with_residual`), so the scan's rounding is
        # relative to the correction rather than to the states. (Solving for the
        # states, float32 trajectories converged 30-100x further from the truth than
        # the sequential solver's on the same grid: Van der Pol, T = 1e4, 4.3e-4 for
        # the exponential scheme and 1.1e-4 for the Heun map, against Heun's 3.9e-6;
        # now 1.0e-6 and 3.4e-6.) Far from it (a residual as large as the states: a wild
        # guess, or overflowing iterates) the correction would cancel the old states
        # and their rounding with them: there the states are solved for, as before.
        # One scan either way.
        A, b, residual = args.shard(args.linearise_with_residual(y))
        size = jnp.max(jnp.abs(y), axis=-1)
        near = jnp.all(jnp.max(jnp.abs(residual), axis=-1) <= 0.5 * size)
        rhs = jnp.where(near, -residual, b)
        x0 = jnp.where(near, jnp.zeros_like(args.init), args.init)
        out = solve_linear_recurrence(A, rhs, x0, sharding=args.time_sharding)
        full = args.shard(jnp.where(near, y + out, out))
        if args.explicit_recurrence:
            new, finite = _reset_non_finite(full, y, args.init)
            kept, end, window = jnp.array(True), jnp.array(T, jnp.int32), state.window
        else:
            new, kept, end, window = _windowed_update(full, y, args.init, state)
            finite = jnp.all(jnp.isfinite(full) | (jnp.arange(T) >= end)[:, None])
        rtol, atol = self._tolerances(y.dtype)
        scaled_update = (new - y) / (atol + rtol * jnp.abs(new))
        big = jnp.max(jnp.abs(scaled_update), axis=-1) > 1
        start = jnp.minimum(jnp.min(jnp.where(big, jnp.arange(T, dtype=jnp.int32), T)), end)
        covered = end >= T
        scaled = jnp.where(covered, self.norm(scaled_update), jnp.inf)
        if args.explicit_recurrence:
            streak = jnp.where(finite, 0, state.streak + 1)
        else:
            # Window shortenings (or a non-finite first state) since the converged
            # states last advanced.
            first = take_row(full, jnp.minimum(state.start, T - 1))
            failed = jnp.invert(kept) | jnp.invert(jnp.all(jnp.isfinite(first)))
            streak = jnp.where(start > state.start, 0, state.streak + failed.astype(jnp.int32))
        new_state = _NewtonState(
            state.step + 1, scaled, kept & covered & (scaled <= 1), finite, streak,
            state.num_rejected + jnp.invert(kept).astype(jnp.int32), start, window,
            jnp.minimum(state.min_window, window), state.guess_size,
        )
        return new, new_state, None

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, options, tags
        if not (self.sequential_fallback and args.explicit_recurrence):
            return y, aux, {}
        T = y.shape[0]
        start = jnp.where(result == optx.RESULTS.successful, T, state.start)
        # (Under a branch: along a time axis sharded over devices, the sequential loop
        # gathers the trajectory, which a converged solve should not pay for.)
        y = lax.cond(start < T, lambda y, s: args.complete(y, s), lambda y, _: y, y, start)
        return y, aux, {"num_sequential": (T - start).astype(jnp.int32)}


_MIN_DAMPING = 1e-12
_MAX_DAMPING = 1e12
_STALL_FACTOR = 1e6


class _LinearModel(eqx.Module):
    """ELK's linear model at its current iterate: the linearisation (transitions and
    offsets), the undamped Newton step from the iterate, and the residual sum of
    squares there."""

    transitions: Array
    offsets: Float[Array, "T D"]
    newton: Float[Array, "T D"]
    residual_sq: Float[Array, ""]


class _ELKState(eqx.Module):
    step: Int[Array, ""]
    damping: Float[Array, ""]
    model: _LinearModel
    # As `_NewtonState`:
    update_norm: Float[Array, ""]
    converged: Bool[Array, ""]
    finite: Bool[Array, ""]
    streak: Int[Array, ""]
    num_rejected: Int[Array, ""]


def _linearise(problem, ys) -> _LinearModel:
    """The linear model of `problem` at `ys`."""
    A, b = problem.shard(problem.linearise(problem.shard(ys)))
    r = model_residual(A, b, problem.init, ys)
    newton = solve_linear_recurrence(A, b, problem.init, sharding=problem.time_sharding)
    return _LinearModel(A, b, newton, jnp.sum(r**2))


class ELK(AbstractTrajectoryRootFinder):
    r"""ELK (Gonzalez et al., 2024): Levenberg--Marquardt steps on a whole trajectory,
    each a parallel Kalman smoother (see `_kalman.py`), in a trust-region loop; quasi-ELK
    when the problem linearises with diagonal transitions.

    A step is accepted when it reduces the residual sum of squares by at least a small
    fraction of what the linear model predicts (the classical trust-region test; the
    damping is adapted by that ratio), or when it reduces the *natural level*
    $\|\tilde L(y)^{-1} r(y)\|$, the size of the Newton (DEER) correction (Deuflhard's
    affine-invariant monotonicity test). The second test matters for the ODE schemes,
    whose linearisation is not the exact Jacobian of their residual: near the solution
    the residual's predicted decrease can drown in the Jacobian's error and stall a
    purely residual-based trust region, while the Newton correction still shrinks.
    When neither test can be passed however strongly the step is damped (the damping
    has grown by a factor $10^6$: an inexact linearisation far from the solution, where
    its damped direction is not a descent direction), the loop takes one undamped
    Newton step (non-finite states reset as in DEER) and restarts the damping. So ELK
    never stalls where DEER would converge, and keeps its damping where DEER overflows.
    Converged when the Newton correction from the current iterate is within tolerance;
    that Newton step is returned, so the answer is DEER's.

    **Arguments:** `rtol`, `atol`, `norm`, `jacobian` as for
    [`diffrax_deer.ParallelNewton`][] (`jacobian="diagonal"`: quasi-ELK); `damping`,
    the initial Levenberg--Marquardt damping (default 1).

    !!! example

        ```python
        diffrax_deer.DEER(root_finder=diffrax_deer.ELK(damping=10.0))
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Array] = optx.max_norm
    jacobian: Jacobian = eqx.field(static=True, default="dense")
    damping: float = 1.0
    exact_after_length: ClassVar[bool] = False
    name: ClassVar[str] = "elk"

    def __check_init__(self):
        if not self.damping > 0:
            raise ValueError(f"`damping` must be positive; got {self.damping}.")

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, options, f_struct, tags
        _check_problem(args, aux_struct)
        zero = jnp.array(0, jnp.int32)
        return _ELKState(
            zero, jnp.asarray(self.damping, y.dtype), _linearise(args, y),
            jnp.array(jnp.inf, y.dtype), jnp.array(False), jnp.array(True), zero, zero,
        )

    def step(self, fn, y, args, options, state, tags):
        del fn, options, tags
        init, lam, model = args.init, state.damping, state.model
        rtol, atol = self._tolerances(y.dtype)
        weight = 1 / (atol + rtol * jnp.abs(y))
        newton_scaled = _scaled_norm(model.newton - y, model.newton, self)
        converged = jnp.all(jnp.isfinite(model.newton)) & (newton_scaled <= 1)
        stall = jnp.minimum(jnp.asarray(self.damping, y.dtype) * _STALL_FACTOR, _MAX_DAMPING)
        stalled = lam >= stall
        damped = damped_recurrence(
            model.transitions, model.offsets, init, y, lam, args.time_sharding
        )
        step, _ = _reset_non_finite(model.newton, y, init)
        step = jnp.where(stalled, step, damped)
        r_model = model_residual(model.transitions, model.offsets, init, step)
        predicted = model.residual_sq - jnp.sum(r_model**2)
        new = _linearise(args, step)
        level = lambda newton, ys: jnp.sum((weight * (newton - ys)) ** 2)
        natural = level(new.newton, step) < (1 - 1e-4) * level(model.newton, y)
        ok = jnp.isfinite(new.residual_sq) & jnp.all(jnp.isfinite(new.newton))
        reduction = model.residual_sq - new.residual_sq
        ratio = jnp.where(ok & (predicted > 0), reduction / predicted, -jnp.inf)
        accept = ok & ((ratio > 1e-4) | natural | stalled) & jnp.invert(converged)
        grow = (ratio > 0.75) | (natural & (ratio <= 1e-4))
        lam = jnp.where(accept & grow, lam / 3, jnp.where(ratio < 0.25, 4 * lam, lam))
        lam = jnp.where(stalled, jnp.asarray(self.damping, y.dtype), lam)
        keep = lambda new, old: jnp.where(accept, new, old)
        model = jtu.tree_map(keep, new, model)
        new_state = _ELKState(
            state.step + 1, jnp.clip(lam, _MIN_DAMPING, _MAX_DAMPING), model,
            jnp.where(converged, newton_scaled, jnp.inf), converged,
            jnp.isfinite(model.residual_sq), jnp.array(0, jnp.int32),
            state.num_rejected + jnp.invert(accept | converged).astype(jnp.int32),
        )
        return jnp.where(converged, state.model.newton, keep(step, y)), new_state, None


def _stats(sol: optx.Solution, dtype) -> NewtonStats:
    """The `NewtonStats` of a root find by one of the root finders above."""
    state = sol.state
    # Out of steps with a non-finite last linear solve: that is a divergence. Completed
    # by sequential evaluation (a finite one): that is the answer.
    result = optx.RESULTS.where(
        (sol.result == optx.RESULTS.nonlinear_max_steps_reached) & jnp.invert(state.finite),
        optx.RESULTS.nonlinear_divergence,
        sol.result,
    )
    completed = completed_sequentially(sol.value, sol.stats)
    result = optx.RESULTS.where(completed, optx.RESULTS.successful, result)
    successful = result == optx.RESULTS.successful
    scaled = jnp.where(completed, 0, state.update_norm)
    scaled = jnp.where(successful, scaled, jnp.maximum(scaled, 1 + jnp.finfo(dtype).eps))
    length = jnp.array(sol.value.shape[0], jnp.int32)
    return NewtonStats(
        jnp.asarray(sol.stats["num_steps"], jnp.int32), scaled, result, state.num_rejected,
        jnp.array(jnp.nan, dtype), getattr(state, "min_window", length),
        sol.stats.get("num_sequential", jnp.array(0, jnp.int32)),
    )


def root_finder_for(method: str, **options) -> AbstractTrajectoryRootFinder:
    """The root finder a `method=` shorthand names: `"deer"` / `"quasi-deer"`
    ([`diffrax_deer.ParallelNewton`][] with a dense / diagonal Jacobian), `"elk"` /
    `"quasi-elk"` ([`diffrax_deer.ELK`][]), built with `options` (`rtol`, `atol`,
    `norm`; `damping` for ELK)."""
    name, _, base = method.rpartition("-")
    if name not in ("", "quasi") or base not in ("deer", "elk"):
        raise ValueError(
            "`method` must be one of ['deer', 'quasi-deer', 'elk', 'quasi-elk']; got "
            f"{method!r}."
        )
    jacobian = "diagonal" if name == "quasi" else "dense"
    if base == "deer":
        options.pop("damping", None)
        return ParallelNewton(jacobian=jacobian, **options)
    return ELK(jacobian=jacobian, **options)


def solve_trajectory(
    problem: AbstractTrajectoryProblem,
    guess: Float[Array, "T D"],
    root_finder: AbstractTrajectoryRootFinder,
    max_iters: int = 100,
) -> tuple[Float[Array, "T D"], NewtonStats]:
    """Solves for the trajectory of `problem` from `guess` with `optimistix.root_find`
    and `root_finder`, differentiable (forward and reverse mode) with respect to every
    array in `problem` by the implicit function theorem (`ImplicitTrajectoryAdjoint`).
    `guess` is not differentiated. Failures are reported in the stats' `result`, never
    raised here."""
    # (Non-finite guesses start from the initial state: optimistix stops at once on a
    # non-finite iterate.)
    guess = jax.lax.stop_gradient(jnp.where(jnp.isfinite(guess), guess, problem.init))
    sol = optx.root_find(
        _residual, root_finder.with_default_tolerances(guess.dtype), guess,
        args=problem, max_steps=max_iters, adjoint=ImplicitTrajectoryAdjoint(),
        throw=False,
    )
    return sol.value, _stats(sol, guess.dtype)
