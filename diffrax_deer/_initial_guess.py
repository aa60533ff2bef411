r"""Initial guesses for a window's Newton iteration.

Newton's method converges quadratically once it is close; from a constant guess it can
spend many iterations getting there (oscillating dynamics: tens of iterations) or not
get there at all. The *coarse-grid predictor* (nested iteration, as in multigrid) solves
the same window with the same scheme on a coarser grid and interpolates that solution
onto the finer grid as its initial guess, by cubic Hermite interpolation from its values
and slopes for every scheme ($O(\Delta^4)$ from the coarse trajectory; a Runge--Kutta
solver's own dense output, which needs every coarse step's stages again, gave the same
fine-grid iteration counts on the training benchmark from a 7% larger program). One
coarse level, from the constant guess, except for very long windows (`coarse_levels`).
The fine level then typically needs one to three iterations.

The guess changes only how fast Newton converges, never the answer: the converged
trajectory is the fixed point of the fine grid's scheme, and gradients never depend on
the guess (it is not differentiated).
"""

import abc
import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int

from ._discretisation import AbstractWindowScheme
from ._interpolation import HermiteGridInterpolation
from ._newton import is_successful
from ._root_finder import AbstractTrajectoryRootFinder, solve_trajectory


COARSENING_FACTOR = 8
MIN_COARSE_INTERVALS = 32
# A coarse grid with at most this many intervals is solved from the constant guess
# rather than from a predictor of its own. Each level is a separately compiled Newton
# loop (measured 1.2-1.5 s of first-call compile time each on CPU), and on grids this
# small the extra iterations from the constant guess cost little: with one level
# instead of two at T = 1e4 (CPU, py3.11) the fine-grid iterations were unchanged
# (mlp4 2, vdp 2, hnn8 1), forward time within noise, compile 1.5-2.6 s less.
MAX_DIRECT_INTERVALS = 2048
# The largest coarsening from a grid to the one level below it: a grid of up to
# MAX_FACTOR * MAX_DIRECT_INTERVALS intervals (131072) has one coarse level, of at most
# MAX_DIRECT_INTERVALS. Measured at T = 1e5 (CPU, py3.11, `bench_training`'s problems,
# fresh processes, two rounds): one level of 2048 intervals instead of two (12499 and
# 1562) kept the fine-grid iterations (vdp 2, mlp4 1, hnn8 1) with fewer coarse ones,
# forward time the same or 3-15% less, and the first call compiled 0.8-2.7 s sooner
# (forward 3.2-6.9 -> 2.3-4.2 s; mlp4's gradient 9.6-14.1 -> 8.1-11.8 s). A larger
# jump costs fine iterations: a guess is only as accurate as its grid's discretisation
# error (f^2 times the fine grid's for the 2nd-order scheme); Van der Pol at T = 1e6
# took 2 fine iterations from one level of 16129 intervals (factor 62) against 1 from
# 124999 (factor 8, itself from one level of 2048).
MAX_FACTOR = 64


def coarse_levels(
    num_points: int,
    factor: int = COARSENING_FACTOR,
    min_intervals: int = MIN_COARSE_INTERVALS,
    max_direct_intervals: int = MAX_DIRECT_INTERVALS,
    max_factor: int = MAX_FACTOR,
) -> tuple[int, ...]:
    """The intervals of the predictor's coarse grids for a window of `num_points`
    points, finest first; empty if the window is too short to coarsen. A grid's coarse
    level has `factor` times fewer intervals, at most `max_direct_intervals`, and is
    the last (solved from the constant guess), unless that cap would coarsen the grid
    by more than `max_factor`: then it keeps `factor` times fewer intervals and has a
    coarse level of its own.

    >>> coarse_levels(10_001), coarse_levels(100_001), coarse_levels(1_000_001)
    ((1250,), (2048,), (125000, 2048))
    """
    levels = []
    n_fine = num_points - 1
    while (n := n_fine // factor) >= min_intervals:
        if n <= max_direct_intervals or n_fine <= max_factor * max_direct_intervals:
            levels.append(min(n, max_direct_intervals))
            break
        levels.append(n)
        n_fine = n
    return tuple(levels)


def constant_guess(problem: AbstractWindowScheme) -> Float[Array, "T D"]:
    """The initial state repeated over the window (the DEER paper's choice)."""
    return jnp.broadcast_to(problem.y0, (problem.num_points - 1, problem.y0.size))


def coarse_grid_guess(
    problem: AbstractWindowScheme,
    root_finder: AbstractTrajectoryRootFinder,
    max_iters: int,
    **levels_options: int,
) -> tuple[Float[Array, "T D"], Int[Array, ""]]:
    """Initial guess from solving the window on the coarse grids of `coarse_levels`
    (called with `levels_options`) with `root_finder`, coarsest first, each from the
    constant guess or the interpolated solution of the level below, and the number of
    Newton iterations spent on all coarse levels.

    Falls back to `constant_guess` when the window is too short to coarsen, and a level
    whose coarse solve fails (no convergence, or non-finite values) starts from the
    constant guess."""
    levels = coarse_levels(problem.num_points, **levels_options)
    iters = jnp.array(0, jnp.int32)
    if not levels:
        return constant_guess(problem), iters
    # The guess is never differentiated: keep autodiff out of the coarse solves.
    dynamic, static = eqx.partition(problem, eqx.is_inexact_array)
    problem = eqx.combine(lax.stop_gradient(dynamic), static)
    # A coarse solve that fails falls back to the constant guess: completing it
    # sequentially (`ParallelNewton.sequential_fallback`) would only cost compile time.
    if getattr(root_finder, "sequential_fallback", False):
        root_finder = dataclasses.replace(root_finder, sequential_fallback=False)
    grids = [problem.coarsen(n + 1) for n in levels[::-1]] + [problem]
    guess = constant_guess(grids[0])
    for coarse, finer in zip(grids[:-1], grids[1:], strict=True):
        ys, stats = solve_trajectory(coarse, guess, root_finder, max_iters)
        ys_full = jnp.concatenate([coarse.y0[None], ys])
        interp = HermiteGridInterpolation(
            t0=coarse.t0, t1=coarse.t1, ts=coarse.ts, ys=ys_full, fs=coarse.slopes(ys_full)
        )
        fine = jax.vmap(interp.evaluate)(finer.ts[1:])
        ok = is_successful(stats) & jnp.all(jnp.isfinite(fine))
        guess = jnp.where(ok, fine, constant_guess(finer))
        iters = iters + stats.num_iters
    return guess, iters


class AbstractInitialGuess(eqx.Module):
    """How each window's Newton iteration starts: the option
    `DEER(initial_guess=...)`. The guess changes only how many iterations a window
    takes, never its answer, gradients or error estimate."""

    @abc.abstractmethod
    def __call__(
        self,
        problem: AbstractWindowScheme,
        root_finder: AbstractTrajectoryRootFinder,
        max_iters: int,
    ) -> tuple[Float[Array, "T D"], Int[Array, ""]]:
        """The initial trajectory of the window `problem` (its grid after `y0`), and
        the Newton iterations spent finding it (on coarse grids)."""


class ConstantGuess(AbstractInitialGuess):
    """The window's initial state at every grid point (the DEER paper's choice)."""

    def __call__(self, problem, root_finder, max_iters):
        del root_finder, max_iters
        return constant_guess(problem), jnp.array(0, jnp.int32)


class CoarseGridGuess(AbstractInitialGuess):
    r"""The coarse-grid predictor (the default; see the module doc): solve the window
    with the same scheme and root finder on a grid with `factor` times fewer intervals
    (at least `min_intervals`), capped at `max_direct_intervals` intervals and solved
    from the constant guess, and interpolate that solution onto the window's grid. Only
    where the cap would coarsen by more than `max_factor` (windows of more than
    `max_factor * max_direct_intervals` intervals, 131072 by default) does the coarse
    grid keep `factor` times fewer intervals and get a predictor of its own
    (recursively). The fine grid then usually needs 1-3 Newton iterations; each coarse
    level (a separately compiled Newton loop) costs a fraction of the level above.
    Windows too short to coarsen start from `ConstantGuess`.

    !!! example

        ```python
        diffrax_deer.DEER(initial_guess=diffrax_deer.CoarseGridGuess(factor=4))
        ```
    """

    factor: int = eqx.field(static=True, default=COARSENING_FACTOR)
    min_intervals: int = eqx.field(static=True, default=MIN_COARSE_INTERVALS)
    max_direct_intervals: int = eqx.field(static=True, default=MAX_DIRECT_INTERVALS)
    max_factor: int = eqx.field(static=True, default=MAX_FACTOR)

    def __check_init__(self):
        for name in ("factor", "max_factor"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 2):
                raise ValueError(f"`{name}` must be an integer >= 2; got {value!r}.")
        for name in ("min_intervals", "max_direct_intervals"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")

    def __call__(self, problem, root_finder, max_iters):
        return coarse_grid_guess(
            problem, root_finder, max_iters, factor=self.factor,
            min_intervals=self.min_intervals,
            max_direct_intervals=self.max_direct_intervals, max_factor=self.max_factor,
        )


class WarmStartGuess(AbstractInitialGuess):
    """A *warm start*: `fn(t)`, a state like `y0`, evaluated on each window's grid;
    e.g. `fn = previous_sol.evaluate`, the same trajectory's solution at the previous
    training step (with `SaveAt(dense=True)`), so that Newton needs one or two
    iterations. `fn` may hold arrays (it is not static).

    !!! example

        ```python
        solver = diffrax_deer.DEER(initial_guess=diffrax_deer.WarmStartGuess(sol.evaluate))
        ```
    """

    fn: Callable

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(f"`WarmStartGuess(fn)` needs a callable; got {self.fn!r}.")

    def __call__(self, problem, root_finder, max_iters):
        del root_finder, max_iters
        return _warm_start(self.fn, problem), jnp.array(0, jnp.int32)


def _warm_start(fn, problem: AbstractWindowScheme) -> Float[Array, "T D"]:
    """`fn(t)` on the window's grid (after `y0`), flattened; checked against `y0`."""
    ts, flattener = problem.ts[1:], problem.flattener
    try:
        struct = jax.eval_shape(fn, ts[0])
    except Exception as e:
        raise ValueError(
            "`DEER(initial_guess=fn)` must be a function of a scalar time returning a "
            "state like `y0` (e.g. a previous solution's `sol.evaluate`)."
        ) from e
    expected = jax.eval_shape(flattener.unravel, problem.init)
    if jtu.tree_structure(struct) != jtu.tree_structure(expected) or any(
        a.shape != b.shape
        for a, b in zip(jtu.tree_leaves(struct), jtu.tree_leaves(expected), strict=True)
    ):
        raise ValueError(
            "`DEER(initial_guess=fn)`: `fn(t)` must return a PyTree with the structure "
            f"and shapes of `y0`; got {struct} for {expected}."
        )
    guess = jax.vmap(lambda t: flattener.ravel(fn(t)))(ts)
    return guess.astype(problem.init.dtype)


def as_initial_guess(guess: "AbstractInitialGuess | str | Callable") -> AbstractInitialGuess:
    """An `AbstractInitialGuess` from the shorthands `"coarse"`, `"constant"` or a
    function of time (a warm start)."""
    if isinstance(guess, AbstractInitialGuess):
        return guess
    if isinstance(guess, str):
        if guess == "coarse":
            return CoarseGridGuess()
        if guess == "constant":
            return ConstantGuess()
    elif callable(guess):
        return WarmStartGuess(guess)
    raise ValueError(
        "`initial_guess` must be a `diffrax_deer.CoarseGridGuess`, `ConstantGuess` or "
        "`WarmStartGuess`, the shorthands 'coarse' or 'constant', or a function of time "
        f"returning a state like `y0`; got {guess!r}."
    )
