"""Options as objects: `DEER(root_finder=..., initial_guess=..., discretisation=...)` and
`scan(..., root_finder=...)` give what their shorthands give, validate themselves, and
refuse to be combined with the shorthands they replace."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
import pytest

import diffrax_deer
from diffrax_deer import (
    CoarseGridGuess,
    ConstantGuess,
    DEER,
    ELK,
    ExponentialTrapezoid,
    ParallelNewton,
    RungeKuttaMap,
    WarmStartGuess,
)

from .helpers import reference_solution, van_der_pol


Y0 = jnp.array([2.0, 0.0])
TS = jnp.linspace(0.0, 3.0, 7)


def _solve(solver, saveat=diffrax.SaveAt(ts=TS, solver_state=True)):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(van_der_pol), solver, 0.0, 3.0, 3.0, Y0, args=1.0, saveat=saveat
    )


@pytest.mark.parametrize(
    "method, finder",
    [
        ("quasi-deer", ParallelNewton(rtol=1e-10, atol=1e-10, jacobian="diagonal")),
        ("elk", ELK(rtol=1e-10, atol=1e-10, damping=2.0)),
    ],
)
def test_root_finder_objects_are_the_shorthands(method, finder):
    assert finder.method == method
    shorthand = DEER(num_points=257, method=method, rtol=1e-10, atol=1e-10,
                     initial_damping=2.0 if method == "elk" else None)
    assert shorthand.resolved_root_finder == finder
    a, b = _solve(shorthand), _solve(DEER(num_points=257, root_finder=finder))
    assert jnp.array_equal(a.ys, b.ys)
    assert int(a.solver_state.total_iters) == int(b.solver_state.total_iters)
    ref = reference_solution(van_der_pol, Y0, 1.0, 0.0, 3.0, TS)
    assert jnp.max(jnp.abs(b.ys - ref)) < 1e-3  # 2nd order on 257 points


def test_initial_guess_objects():
    ref = _solve(DEER(num_points=513))
    ys = ref.ys
    coarse = _solve(DEER(num_points=513, initial_guess=CoarseGridGuess(factor=4)))
    constant = _solve(DEER(num_points=513, initial_guess=ConstantGuess()))
    for sol in (coarse, constant):
        assert jnp.max(jnp.abs(sol.ys - ys)) < 1e-9
    # Only the guess differs: the constant guess needs more fine-grid iterations.
    assert int(constant.solver_state.total_iters) > int(coarse.solver_state.total_iters)
    assert int(constant.solver_state.total_coarse_iters) == 0
    # A warm start from the solution itself converges at once.
    dense = _solve(DEER(num_points=513), diffrax.SaveAt(dense=True))
    warm = _solve(DEER(num_points=513, initial_guess=WarmStartGuess(dense.evaluate)))
    assert jnp.max(jnp.abs(warm.ys - ys)) < 1e-9
    assert int(warm.solver_state.total_iters) == 1
    assert DEER(initial_guess="coarse").initial_guess == "coarse"  # shorthands stay


def test_coarse_levels():
    # One coarse level of at most 2048 intervals, from the constant guess, while that
    # coarsens at most 64-fold; beyond, a level 8x coarser with a predictor of its own.
    from diffrax_deer._initial_guess import coarse_levels

    assert coarse_levels(256) == ()  # too short to coarsen (31 < 32 intervals)
    assert coarse_levels(257) == (32,)
    assert coarse_levels(10_001) == (1250,)
    assert coarse_levels(16_393) == (2048,)
    assert coarse_levels(100_001) == (2048,)
    assert coarse_levels(131_073) == (2048,)  # 131072 intervals: 64-fold
    assert coarse_levels(131_081) == (16_385, 2048)
    assert coarse_levels(1_000_001) == (125_000, 2048)
    assert coarse_levels(2_000_001) == (250_000, 31_250, 2048)
    assert coarse_levels(513, factor=4) == (128,)
    assert coarse_levels(100_001, max_factor=8) == (12_500, 1562)  # two levels, as before `max_factor`


def test_discretisation_objects():
    term = diffrax.ODETerm(van_der_pol)
    for short, obj in [(None, ExponentialTrapezoid()), (diffrax.Heun(), RungeKuttaMap(diffrax.Heun()))]:
        a, b = DEER(discretisation=short), DEER(discretisation=obj)
        assert (a.order(term), a.error_order(term)) == (b.order(term), b.error_order(term))
        assert a.interpolation_cls == b.interpolation_cls
    assert DEER(discretisation=diffrax.Tsit5()).error_order(term) == 5
    assert DEER(discretisation=diffrax.Euler()).error_order(term) == 2  # defect estimate
    a = _solve(DEER(num_points=65, discretisation=diffrax.Heun()))
    b = _solve(DEER(num_points=65, discretisation=RungeKuttaMap(diffrax.Heun())))
    assert jnp.array_equal(a.ys, b.ys)


def test_options_validate_themselves():
    with pytest.raises(ValueError, match="jacobian"):
        ParallelNewton(jacobian="full")
    with pytest.raises(ValueError, match="rtol"):
        ELK(rtol=-1.0)
    with pytest.raises(ValueError, match="damping"):
        ELK(damping=0.0)
    with pytest.raises(ValueError, match="factor"):
        CoarseGridGuess(factor=1)
    with pytest.raises(ValueError, match="max_factor"):
        CoarseGridGuess(max_factor=1)
    with pytest.raises(TypeError, match="callable"):
        WarmStartGuess(3.0)
    with pytest.raises(TypeError, match="implicit"):
        RungeKuttaMap(diffrax.Kvaerno5())
    with pytest.raises(TypeError, match="implicit"):
        DEER(discretisation=diffrax.Kvaerno5())
    with pytest.raises(ValueError, match="initial_guess"):
        DEER(initial_guess="linear")
    with pytest.raises(ValueError, match="root finder"):
        DEER(root_finder=ELK(), rtol=1e-6)
    with pytest.raises(ValueError, match="root finder"):
        DEER(root_finder=ParallelNewton(), method="elk")
    with pytest.raises(TypeError, match="ParallelNewton"):
        DEER(root_finder=optx.Newton(rtol=1e-6, atol=1e-6))
    h0 = jnp.zeros(2)
    xs = jnp.ones((5, 2))
    with pytest.raises(ValueError, match="root finder"):
        diffrax_deer.scan(lambda c, x: (c, c), h0, xs, root_finder=ELK(), method="deer")
    with pytest.raises(ValueError, match="root finder"):
        diffrax_deer.scan(lambda c, x: (c, c), h0, xs, root_finder=ELK(), atol=1e-3)


def test_scan_root_finder_objects():
    cell = eqx.nn.GRUCell(2, 4, key=jax.random.PRNGKey(0))
    xs = jax.random.normal(jax.random.PRNGKey(1), (64, 2))

    def step(h, x):
        h = cell(x, h)
        return h, h

    expected = jax.lax.scan(step, jnp.zeros(4), xs)
    for finder in (ParallelNewton(jacobian="diagonal"), ELK(rtol=1e-10, atol=1e-10)):
        final, hs, stats = diffrax_deer.scan(
            step, jnp.zeros(4), xs, root_finder=finder, return_stats=True
        )
        assert jnp.max(jnp.abs(hs - expected[1])) < 1e-7
        assert stats.result == optx.RESULTS.successful


def test_default_tolerances_follow_the_dtype():
    # Unset tolerances are the dtype's default, also when the root finder is used with
    # `optimistix.root_find` directly.
    assert ParallelNewton().with_default_tolerances(jnp.float64).rtol == 1e-8
    assert ELK().with_default_tolerances(jnp.float32).atol > 1e-6
    assert isinstance(ParallelNewton(), optx.AbstractRootFinder)
