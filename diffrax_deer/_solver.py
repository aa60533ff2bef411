r"""`DEER`: a diffrax solver that solves each step (a window of grid points) in parallel."""

from collections.abc import Callable
from typing import ClassVar, Literal

import diffrax
import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from diffrax import AbstractTerm, ODETerm, RESULTS

# diffrax wraps terms to handle the time direction and backsolve adjoints; these wrappers
# are not exported, so we recognise them from diffrax's private module.
from diffrax._term import AdjointTerm, WrapTerm
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PyTree

from ._discretisation import AbstractDiscretisation, AbstractWindowScheme, uniform_grid
from ._initial_guess import AbstractInitialGuess, as_initial_guess
from ._misc import traced_once, TreeFlattener
from ._newton import is_successful, with_lyapunov_exponent
from ._root_finder import (
    AbstractTrajectoryRootFinder,
    root_finder_for,
    solve_trajectory,
)
from ._runge_kutta import as_discretisation
from ._sharding import time_sharding, TimeSharding


class DEERState(eqx.Module):
    r"""Diagnostics carried between windows; read them with
    `diffeqsolve(..., saveat=diffrax.SaveAt(..., solver_state=True))` as
    `sol.solver_state`.

    - `num_windows`: windows (diffrax steps) accepted so far.
    - `total_iters`: Newton iterations summed over those windows.
    - `max_window_iters`: the most Newton iterations any one window took.
    - `last_window_iters`: Newton iterations of the last window.
    - `last_update_norm`: the last window's final Newton update, in units of the
      tolerance (`<= 1` means converged).
    - `total_coarse_iters`: Newton iterations spent on the coarse grids of the
      `CoarseGridGuess` predictor (each costs a fraction of a full iteration:
      1/8 on the first coarse level, 1/64 on the next, ...).
    - `lyapunov_exponent`: with `DEER(lyapunov=True)`, the estimate of the largest
      Lyapunov exponent (per unit time), averaged over the windows so far weighted by
      their lengths; NaN otherwise. Each window's estimate carries an $O(1/\text{length})$
      bias from transients, so short windows overestimate it.
    - `lyapunov_time`: the integration time that estimate covers. See
      [`diffrax_deer.lyapunov_exponent`][]: below zero, long windows converge in a few
      iterations; above zero, keep windows shorter than a few $1/\lambda$.
    - `total_rejected`: Newton steps whose sliding window was shortened (see
      [`diffrax_deer.ParallelNewton`][]; ELK: trust-region steps rejected), summed
      over the windows; 0 on contractive problems.
    - `min_sliding_window`: the shortest sliding window any window's Newton iteration
      used, in grid intervals (`num_points - 1` when none was shortened): how far one
      linearisation could be trusted on the hardest stretch.

    Iteration counts refer to the full grid of each window.
    """

    num_windows: Int[Array, ""]
    total_iters: Int[Array, ""]
    max_window_iters: Int[Array, ""]
    last_window_iters: Int[Array, ""]
    last_update_norm: Float[Array, ""]
    total_coarse_iters: Int[Array, ""]
    lyapunov_exponent: Float[Array, ""]
    lyapunov_time: Float[Array, ""]
    total_rejected: Int[Array, ""]
    min_sliding_window: Int[Array, ""]


def _ode_term(terms) -> AbstractTerm:
    term = terms
    while isinstance(term, WrapTerm):
        term = term.term
    if isinstance(term, AdjointTerm):
        raise NotImplementedError(
            "`diffrax_deer.DEER` does not support `diffrax.BacksolveAdjoint`: solving the "
            "adjoint ODE in parallel would need Jacobians over every parameter. Use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()` (the default) or "
            "`diffrax.DirectAdjoint()`; DEER already differentiates each window by the "
            "implicit function theorem, so memory does not grow with Newton iterations."
        )
    if not isinstance(term, ODETerm):
        raise TypeError(
            "`diffrax_deer.DEER` solves ODEs dy/dt = f(t, y, args) given as a single "
            f"`diffrax.ODETerm`; got {type(term).__name__}. SDEs (terms with Brownian "
            "motion), controlled differential equations and `MultiTerm`s are not "
            "supported."
        )
    return terms


def _closure_convert(terms, t0, y0, args):
    """`terms` with the ODE's vector field closure-converted: every array it closes
    over (e.g. a traced parameter, under `jit`/`vmap`/`grad`) becomes a leaf of the
    term, so that the implicit derivative sees it and differentiates through it. (An
    array hidden in a Python closure would leak into the custom derivative rule as a
    foreign tracer.) As optimistix does for the functions it solves."""
    if isinstance(terms, WrapTerm):
        inner = _closure_convert(terms.term, t0 * terms.direction, y0, args)
        return eqx.tree_at(lambda w: w.term, terms, inner)
    vf = eqx.filter_closure_convert(terms.vector_field, t0, y0, args)
    return eqx.tree_at(lambda term: term.vector_field, terms, vf)


# Rematerialised in reverse mode, for the reason given at `_newton._implicit_tangent`:
# the dense output and error estimate evaluate the vector field at every grid point (and
# every Runge--Kutta stage), and a loop that stores per-step residuals
# (`diffrax.DirectAdjoint`) would store those evaluations' linearisations once per padded
# step (measured 128 MiB of temporaries against 9 MiB, mlp4 with Tsit5's map on 1001
# points, `max_steps=4`). Recomputing them costs one batched evaluation.
@eqx.filter_checkpoint
def _outputs(problem: AbstractWindowScheme, ys_full):
    return problem.outputs(ys_full)


class DEER(diffrax.AbstractAdaptiveSolver):
    r"""Parallel-in-time ODE solver (DEER: Lim et al., ICLR 2024).

    Each diffrax step is one *window* of `num_points` uniformly spaced grid points,
    solved all at once: Newton's method on the whole trajectory of the window, each
    iteration a batched evaluation of $f$ and its Jacobian, a batched matrix
    exponential and one parallel associative scan (see
    [`diffrax_deer.linear_recurrence`][]). The converged grid values are those of the
    paper's exponential-trapezoid scheme, 2nd order in the grid spacing; dense output is
    cubic Hermite. Or, with `discretisation=` an explicit Runge--Kutta solver of diffrax
    (e.g. `diffrax.Tsit5()`), they are those of that solver with a constant step equal
    to the grid spacing, $y_{k+1} = \Phi(t_k, t_{k+1}, y_k)$ with $\Phi$ one step of
    its tableau, found by Newton with the exact Jacobian of $\Phi$; the order, error
    estimate and dense output are then the solver's own. Gradients (forward and
    reverse mode, both `RecursiveCheckpointAdjoint` and `DirectAdjoint`) come from the
    implicit function theorem at the converged trajectory: they are the exact
    derivatives of the discrete solution, and cost one extra parallel solve regardless
    of the number of Newton iterations.

    **Error estimates.** Every window returns one, for every `num_points`, initial
    guess and method, so `diffrax.PIDController` can choose window lengths: the local
    error of each grid interval, estimated from the converged values alone by the
    defect of their Hermite interpolant integrated with Simpson's rule (see
    `AbstractWindowScheme.defect_error`), summed over the window; or a Runge--Kutta
    discretisation's embedded estimate, summed the same way. A window whose Newton
    iteration fails returns NaN values and an infinite error: an adaptive controller
    rejects it and retries it shorter (its gradient is zero); with
    `diffrax.ConstantStepSize` the solve ends with its failure.

    **Choosing `num_points`.** The grid spacing is `dt0 / (num_points - 1)`. Accuracy
    is that of a 2nd-order method on that grid (error roughly proportional to the
    spacing squared), or of the Runge--Kutta `discretisation` (e.g. 5th order: halving
    the spacing divides the error by 32). Parallel speed comes from long windows on
    parallel hardware: pass `dt0 = t1 - t0` for one window over the whole interval;
    pass a smaller `dt0` to chain windows one after the other, e.g. for long horizons
    or non-contractive (chaotic, oscillating) dynamics, where Newton needs more
    iterations on long windows.

    !!! example

        ```python
        import diffrax, diffrax_deer, jax.numpy as jnp

        term = diffrax.ODETerm(lambda t, y, args: -args * y**3)
        sol = diffrax.diffeqsolve(
            term, diffrax_deer.DEER(num_points=1001), t0=0.0, t1=10.0, dt0=10.0,
            y0=jnp.array([1.0, 2.0]), args=0.5,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0, 10, 50), solver_state=True),
        )
        sol.ys                          # (50, 2)
        sol.solver_state.total_iters    # Newton iterations taken

        # Tsit5's fixed-step map on windows of 65 points, window lengths chosen by
        # diffrax's controller from Tsit5's embedded error estimates:
        sol = diffrax.diffeqsolve(
            term, diffrax_deer.DEER(num_points=65, discretisation=diffrax.Tsit5()),
            t0=0.0, t1=10.0, dt0=None, y0=jnp.array([1.0, 2.0]), args=0.5,
            stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
        )

        # Options are objects: quasi-DEER with tighter tolerances, from a constant guess.
        solver = diffrax_deer.DEER(
            root_finder=diffrax_deer.ParallelNewton(
                rtol=1e-10, atol=1e-10, jacobian="diagonal"
            ),
            initial_guess=diffrax_deer.ConstantGuess(),
        )
        ```
    """

    num_points: int = eqx.field(static=True, default=1001)
    root_finder: AbstractTrajectoryRootFinder | None = None
    # Not static: a warm start may hold arrays (e.g. a previous `diffrax.Solution`).
    initial_guess: AbstractInitialGuess | Literal["coarse", "constant"] | Callable = "coarse"
    discretisation: AbstractDiscretisation | diffrax.AbstractSolver | None = None
    max_iters: int = eqx.field(static=True, default=100)
    lyapunov: bool = eqx.field(static=True, default=False)
    # Shorthands for the root finder (see `__init__`'s documentation).
    method: Literal["deer", "quasi-deer", "elk", "quasi-elk"] | None = None
    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Array] | None = None
    initial_damping: float | None = None
    # Sequence parallelism (see `__init__`'s documentation).
    mesh: Mesh | None = eqx.field(static=True, default=None)
    axis_name: str | None = eqx.field(static=True, default=None)

    term_structure: ClassVar = AbstractTerm

    def __check_init__(self):
        if not isinstance(self.num_points, int) or self.num_points < 2:
            raise ValueError(
                f"`num_points` must be an integer >= 2 (a window has at least its two "
                f"endpoints); got {self.num_points!r}."
            )
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ValueError(f"`max_iters` must be an integer >= 1; got {self.max_iters!r}.")
        # Resolving the options validates them (their own `__check_init__`s).
        _ = self.resolved_root_finder
        as_initial_guess(self.initial_guess)
        as_discretisation(self.discretisation)
        _ = self.time_sharding

    @property
    def time_sharding(self) -> TimeSharding | None:
        """The sharding of each window's grid (`mesh`, `axis_name`), checked."""
        return time_sharding(self.mesh, self.axis_name, "DEER")

    @property
    def resolved_root_finder(self) -> AbstractTrajectoryRootFinder:
        """`root_finder`, or the one the shorthands name (default: DEER,
        `ParallelNewton()`)."""
        shorthands = dict(
            rtol=self.rtol, atol=self.atol, norm=self.norm, damping=self.initial_damping
        )
        given = {k: v for k, v in shorthands.items() if v is not None}
        if self.root_finder is None:
            return root_finder_for(self.method or "deer", **given)
        if self.method is not None or given:
            raise ValueError(
                "`DEER(root_finder=...)` takes its tolerances, norm and damping from the "
                "root finder: pass them to it (e.g. `diffrax_deer.ParallelNewton(rtol=..., "
                f"atol=...)`), not as `DEER` options; got also {sorted(given) or ['method']}."
            )
        if not isinstance(self.root_finder, AbstractTrajectoryRootFinder):
            raise TypeError(
                "`DEER(root_finder=...)` must be a `diffrax_deer.ParallelNewton` or "
                f"`diffrax_deer.ELK`; got {type(self.root_finder).__name__}."
            )
        return self.root_finder

    @property
    def interpolation_cls(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        return as_discretisation(self.discretisation).interpolation_cls

    def order(self, terms) -> int:
        return as_discretisation(self.discretisation).order(terms)

    def error_order(self, terms) -> int:
        # A window's estimate (see `AbstractWindowScheme.defect_error`) with a fixed
        # number N of points sums N - 1 local estimates of order (dt / (N - 1))^q: of
        # order q in the window length dt.
        return as_discretisation(self.discretisation).error_order(terms)

    def init(self, terms, t0, t1, y0, args) -> DEERState:
        _ode_term(terms)
        flattener = TreeFlattener(y0)
        zero = jnp.array(0, jnp.int32)
        dtype = flattener.dtype
        nan = jnp.array(jnp.nan, dtype)
        return DEERState(
            zero, zero, zero, zero, jnp.array(0.0, dtype), zero, nan, jnp.zeros((), dtype),
            zero, jnp.array(self.num_points - 1, jnp.int32),
        )

    def step(self, terms, t0, t1, y0, args, solver_state: DEERState, made_jump):
        del made_jump
        return _step(self, terms, t0, t1, y0, args, solver_state)

    def _step(self, terms, t0, t1, y0, args, solver_state: DEERState):
        # (The example time has the grid's dtype: the converted field is called at it.)
        terms = _closure_convert(_ode_term(terms), uniform_grid(t0, t1, 2)[0], y0, args)
        flattener = TreeFlattener(y0)
        y0_flat = eqx.error_if(
            flattener.ravel(y0),
            jnp.invert(jnp.all(jnp.isfinite(flattener.ravel(y0)))),
            "`diffrax_deer.DEER` got a non-finite (NaN or inf) initial state `y0`.",
        )
        finder = self.resolved_root_finder.with_default_tolerances(flattener.dtype)
        problem = as_discretisation(self.discretisation).window(
            terms=terms, args=args, t0=jnp.asarray(t0), t1=jnp.asarray(t1), y0=y0_flat,
            flattener=flattener, num_points=self.num_points, jacobian=finder.jacobian,
            time_sharding=self.time_sharding,
        )
        guess, coarse_iters = as_initial_guess(self.initial_guess)(problem, finder, self.max_iters)
        ys, stats = solve_trajectory(problem, guess, finder, self.max_iters)
        # A window is only as good as its values: a converged iteration whose values
        # overflowed is a divergence. A failed window returns NaN (there is no answer)
        # and an infinite error, so that an adaptive controller rejects it and retries
        # it shorter (diffrax keeps neither its values nor its result).
        valid = is_successful(stats) & jnp.all(jnp.isfinite(ys))
        result = optx.RESULTS.where(
            is_successful(stats) & jnp.invert(valid),
            optx.RESULTS.nonlinear_divergence,
            stats.result,
        )
        ys_full = jnp.where(valid, jnp.concatenate([y0_flat[None], ys]), jnp.nan)
        dense_info, error = _outputs(problem, ys_full)
        y_error = flattener.unravel(jnp.where(valid, error, jnp.inf))
        state = self._update_state(solver_state, stats, coarse_iters, problem, ys, t0, t1)
        y1 = flattener.unravel(ys_full[-1])
        return y1, y_error, dense_info, state, RESULTS.promote(result)

    def _update_state(self, state, stats, coarse_iters, problem, ys, t0, t1):
        iters = stats.num_iters
        lyapunov = state.lyapunov_exponent
        lyapunov_time = state.lyapunov_time
        if self.lyapunov:
            length = jnp.abs(t1 - t0).astype(lyapunov_time.dtype)
            stats = with_lyapunov_exponent(stats, problem, ys, length / (self.num_points - 1))
            exponent = stats.lyapunov_exponent.astype(lyapunov.dtype)
            previous = jnp.where(lyapunov_time > 0, lyapunov * lyapunov_time, 0)
            lyapunov_time = lyapunov_time + length
            lyapunov = (previous + exponent * length) / lyapunov_time
        return DEERState(
            num_windows=state.num_windows + 1,
            total_iters=state.total_iters + iters,
            max_window_iters=jnp.maximum(state.max_window_iters, iters),
            last_window_iters=iters,
            last_update_norm=stats.update_norm.astype(state.last_update_norm.dtype),
            total_coarse_iters=state.total_coarse_iters + coarse_iters,
            lyapunov_exponent=lyapunov,
            lyapunov_time=lyapunov_time,
            total_rejected=state.total_rejected + stats.num_rejected,
            min_sliding_window=jnp.minimum(state.min_sliding_window, stats.min_window),
        )

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


# diffrax traces `step` three times (see `traced_once`); one window's trace is the
# bulk of a solve's.
_step = traced_once(DEER._step)


DEER.__init__.__doc__ = r"""**Arguments:**

- `num_points`: grid points per window (both ends included), at least 2. Default 1001.
- `root_finder`: the parallel iteration that solves each window, an
    `optimistix.AbstractRootFinder` with its tolerances and Jacobian structure:
    [`diffrax_deer.ParallelNewton`][] (default `ParallelNewton()`: DEER, full Jacobians,
    undamped Newton; `ParallelNewton(jacobian="diagonal")`: quasi-DEER, only the
    diagonal of the Jacobian: $O(TD)$ memory and elementwise exponentials, converging to
    the exponential scheme with a diagonal linear part, also 2nd order) or
    [`diffrax_deer.ELK`][] (ELK / quasi-ELK: the same linearisations with trust-region
    Levenberg--Marquardt steps computed by a parallel Kalman smoother; slower per
    iteration, more robust on dynamics that are not contractive). A window is converged
    when its last update satisfies
    $\|\delta / (\text{atol} + \text{rtol}\,|y|)\| \le 1$; tolerances default to 1e-8
    in float64, about 2e-5 in float32.
- `initial_guess`: how each window's Newton iteration starts, an
    `AbstractInitialGuess`. [`diffrax_deer.CoarseGridGuess`][] (default; shorthand
    `"coarse"`): solve the window on a grid 8x coarser (at least 32 intervals;
    recursively while it has more than 2048) and interpolate; the fine grid then usually
    needs 1-3 iterations. [`diffrax_deer.ConstantGuess`][] (`"constant"`): the window's
    initial state everywhere (the DEER paper's choice).
    [`diffrax_deer.WarmStartGuess`][]`(fn)` (or just a function `fn`): `fn(t) -> state
    like y0` evaluated on each window's grid, e.g. `previous_sol.evaluate` with the
    solution of the same trajectory at the previous training step (its
    `SaveAt(dense=True)`), so that Newton needs one or two iterations. The guess affects
    only speed and robustness, never the converged answer, its gradients or its error
    estimate.
- `discretisation`: the scheme on the grid, an `AbstractDiscretisation`. `None`
    (default) or [`diffrax_deer.ExponentialTrapezoid`][]`()`: the exponential scheme
    above. Or an explicit Runge--Kutta solver of diffrax (any `diffrax.AbstractERK`
    with an explicit tableau: `Tsit5()`, `Dopri5()`, `Dopri8()`, `Bosh3()`, `Heun()`,
    `Midpoint()`, `Ralston()`, ...; or `Euler()`), shorthand for
    [`diffrax_deer.RungeKuttaMap`][]`(solver)`: the grid values are then those of
    `diffeqsolve(..., solver, stepsize_controller=diffrax.ConstantStepSize(),
    dt0=<grid spacing>)`, to the Newton tolerance. Its map is an explicit recurrence,
    so Newton uses the exact Jacobian of one step (its diagonal with a diagonal root
    finder) and converges in at most `num_points - 1` iterations from any guess. Order,
    error estimate and dense output are the solver's: `y_error` is its embedded
    estimate summed (in absolute value) over the window's steps, so `error_order` is
    the solver's own (for `Euler`, which has none: the defect estimate, see "Error
    estimates" above); dense output is the solver's own interpolation on each grid
    interval (e.g. Tsit5's 4th-order polynomial). Implicit, SDE, wrapped and other
    non-Runge--Kutta solvers raise a `TypeError`.
- `max_iters`: maximum Newton iterations per window. Default 100. A window that does
    not converge ends the solve with `sol.result` =
    `RESULTS.nonlinear_max_steps_reached` (or `nonlinear_divergence` if its iterates
    became non-finite); with `diffeqsolve(..., throw=True)` (the default) that raises.
- `lyapunov`: also estimate the largest Lyapunov exponent of each window's trajectory
    (one extra Jacobian evaluation and scan per window), reported (averaged over
    windows) in `DEERState.lyapunov_exponent`. Default False.
- `mesh`, `axis_name`: sequence parallelism. `mesh` a `jax.sharding.Mesh`, `axis_name`
    the mesh axis to shard each window's grid over (default: the mesh's only axis).
    Each device holds its slice of the grid (the Jacobians, exponentials, residuals and
    Kalman elements of its points are computed there); each parallel scan is a local
    scan per device plus one all-gather of the devices' aggregate maps and a local
    fix-up, the transposed scans of the gradients the same backwards, and convergence
    tests reduce across devices. Every root finder, both discretisations, the
    coarse-grid guess, dense output and `SaveAt` work sharded and give the unsharded
    answer to round-off; grids the device count does not divide are padded. Combine
    with data parallelism by `jax.vmap(..., spmd_axis_name="data")` over a batch, with
    a mesh of axes `("data", "time")` and `axis_name="time"`. Default None: one device.
    Call outside `jax.set_mesh` of a mesh with explicit axes (the library places the
    trajectory itself).

    ```python
    mesh = jax.make_mesh((jax.device_count(),), ("time",))
    solver = diffrax_deer.DEER(num_points=2**20, mesh=mesh)
    ```
- Shorthands for the root finder, used only without `root_finder=` (passing both
    raises): `method` (`"deer"`, `"quasi-deer"`, `"elk"`, `"quasi-elk"`), `rtol`,
    `atol`, `norm` and `initial_damping` (ELK's starting damping).
    `DEER(method="quasi-elk", rtol=1e-6)` is
    `DEER(root_finder=ELK(rtol=1e-6, jacobian="diagonal"))`.
"""
