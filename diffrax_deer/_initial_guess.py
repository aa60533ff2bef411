r"""Initial guesses for a window's Newton iteration.

Newton's method converges quadratically once it is close; from a constant guess it can
spend many iterations getting there (oscillating dynamics: tens of iterations) or not
get there at all. The *coarse-grid predictor* (nested iteration, as in multigrid) solves
the same window with the same scheme on a grid `factor` times coarser -- recursively
while that grid is large, and from the constant guess once it has at most
`MAX_DIRECT_INTERVALS` intervals -- and interpolates that solution (with the scheme's own
dense output: cubic Hermite for the exponential scheme, the solver's interpolation for a
Runge--Kutta one) onto the finer grid as its initial guess. Each coarse level costs
about `1/factor` of the level above, and the fine level then typically needs two or
three iterations.

The guess changes only how fast Newton converges, never the answer: the converged
trajectory is the fixed point of the fine grid's scheme, and gradients never depend on
the guess (it is not differentiated).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._discretisation import AbstractWindowScheme
from ._newton import is_successful
from ._root_finder import solve_trajectory


COARSENING_FACTOR = 8
MIN_COARSE_INTERVALS = 32
# A coarse grid with at most this many intervals is solved from the constant guess
# rather than from a predictor of its own. Each level is a separately compiled Newton
# loop (measured 1.2-1.5 s of first-call compile time each on CPU), and on grids this
# small the extra iterations from the constant guess cost little: with one level
# instead of two at T = 1e4 (CPU, py3.11) the fine-grid iterations were unchanged
# (mlp4 2, vdp 2, hnn8 1), forward time within noise, compile 1.5-2.6 s less.
MAX_DIRECT_INTERVALS = 2048


def coarse_intervals(
    num_points: int, factor: int = COARSENING_FACTOR, min_intervals: int = MIN_COARSE_INTERVALS
) -> int | None:
    """Intervals of the first coarse grid, or None if the window is too short."""
    n = (num_points - 1) // factor
    return n if n >= min_intervals else None


def constant_guess(problem: AbstractWindowScheme) -> Float[Array, "T D"]:
    """The initial state repeated over the window (the DEER paper's choice)."""
    return jnp.broadcast_to(problem.y0, (problem.num_points - 1, problem.y0.size))


def coarse_grid_guess(
    problem: AbstractWindowScheme,
    *,
    rtol: float,
    atol: float,
    norm: Callable,
    max_iters: int,
    damping: float | None = None,
    factor: int = COARSENING_FACTOR,
    min_intervals: int = MIN_COARSE_INTERVALS,
    max_direct_intervals: int = MAX_DIRECT_INTERVALS,
) -> tuple[Float[Array, "T D"], Int[Array, ""]]:
    """Initial guess from recursively solving the window on coarser grids, and the
    number of Newton iterations spent on all coarse levels. The coarsest level (at
    most `max_direct_intervals` intervals, or too short to coarsen further) starts
    from the constant guess.

    Falls back to `constant_guess` when the window is too short to coarsen (see
    `coarse_intervals`), or when a coarse solve fails (no convergence, or non-finite
    values)."""
    n_coarse = coarse_intervals(problem.num_points, factor, min_intervals)
    if n_coarse is None:
        return constant_guess(problem), jnp.array(0, jnp.int32)
    # The guess is never differentiated: keep autodiff out of the coarse solves.
    dynamic, static = eqx.partition(problem, eqx.is_inexact_array)
    problem = eqx.combine(lax.stop_gradient(dynamic), static)
    coarse = problem.coarsen(n_coarse + 1)
    if n_coarse <= max_direct_intervals:
        guess, coarser_iters = constant_guess(coarse), jnp.array(0, jnp.int32)
    else:
        guess, coarser_iters = coarse_grid_guess(
            coarse,
            rtol=rtol,
            atol=atol,
            norm=norm,
            max_iters=max_iters,
            damping=damping,
            factor=factor,
            min_intervals=min_intervals,
            max_direct_intervals=max_direct_intervals,
        )
    ys, stats = solve_trajectory(
        coarse, guess, rtol=rtol, atol=atol, norm=norm, max_iters=max_iters,
        damping=damping,
    )
    ys_full = jnp.concatenate([coarse.y0[None], ys])
    interp = coarse.interpolation(ys_full)
    ravel = problem.flattener.ravel
    fine = jax.vmap(lambda t: ravel(interp.evaluate(t)))(problem.ts[1:])
    ok = is_successful(stats) & jnp.all(jnp.isfinite(fine))
    guess = jnp.where(ok, fine, constant_guess(problem))
    return guess, coarser_iters + stats.num_iters
