"""`DEER(discretisation=<explicit Runge--Kutta solver>)`: Newton over the solver's
fixed-step map. Its converged trajectory (grid values and dense output) is that of
diffrax's own sequential solver with `ConstantStepSize` on the same grid; its order is
the tableau's; its embedded error estimate drives `PIDController` over windows; its
gradients are those of the discrete solution.

Kept fast: small windows (17 points, no coarse-grid predictor except in one test), and
one compiled function per solver shared between tests (`dt0`, `t0`, `t1` are traced).
"""

import functools as ft

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffrax_deer import DEER, ParallelNewton

from .helpers import float32_rounding_error, forced_decay, reference_solution, van_der_pol


N = 17  # grid points per window: 16 steps
T0, T1 = 0.0, 4.0
Y0 = jnp.array([2.0, 0.0])
MU = 1.0
# Grid points of every window (for 1, 2 and 4 windows) and points in between.
TS = jnp.sort(jnp.concatenate([jnp.linspace(T0, T1, 9), jnp.array([0.37, 1.234, 2.9])]))
TIGHT = dict(rtol=1e-12, atol=1e-12)
SOLVERS = {
    "euler": diffrax.Euler(),
    "heun": diffrax.Heun(),
    "tsit5": diffrax.Tsit5(),
    "dopri5": diffrax.Dopri5(),
}


@ft.cache
def _deer(name: str, method: str = "deer", num_points: int = N, vf=van_der_pol):
    """Jitted `(y0, t0, t1, dt0, ts) -> (ys at ts, DEERState, result)`: DEER windows
    of length `dt0` (constant step size)."""
    solver = DEER(
        num_points=num_points, discretisation=SOLVERS[name], method=method, **TIGHT
    )

    @jax.jit
    def solve(y0, t0, t1, dt0, ts):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), solver, t0, t1, dt0, y0, args=MU,
            saveat=diffrax.SaveAt(ts=ts, solver_state=True), max_steps=16,
        )
        return sol.ys, sol.solver_state, sol.result

    return solve


@ft.cache
def _sequential(name: str):
    """Jitted `(y0, t0, t1, dt, ts) -> ys`: diffrax's own solver, constant step `dt`."""

    @jax.jit
    def solve(y0, t0, t1, dt, ts):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(van_der_pol), SOLVERS[name], t0, t1, dt, y0, args=MU,
            saveat=diffrax.SaveAt(ts=ts), max_steps=4096,
        )
        return sol.ys

    return solve


@ft.cache
def _reference_t1():
    return reference_solution(van_der_pol, Y0, MU, T0, T1, jnp.array([T1]))[0]


@pytest.mark.parametrize(
    "name,method",
    [("euler", "deer"), ("heun", "deer"), ("tsit5", "deer"), ("tsit5", "quasi-deer")],
)
def test_matches_sequential_solver(name, method):
    # Four windows of 16 steps; grid values and dense output (the solver's own
    # interpolation) equal diffrax's sequential solve on the same grid.
    dt0 = (T1 - T0) / 4
    ys, state, result = _deer(name, method)(Y0, T0, T1, dt0, TS)
    assert result == diffrax.RESULTS.successful
    ref = _sequential(name)(Y0, T0, T1, dt0 / (N - 1), TS)
    np.testing.assert_allclose(ys, ref, rtol=1e-10, atol=1e-10)
    assert int(state.num_windows) == 4
    # An explicit recurrence converges in at most 16 iterations per window; Newton
    # needs far fewer (quasi-DEER converges linearly, so somewhat more).
    assert int(state.max_window_iters) <= (16 if method == "quasi-deer" else 8)


def test_coarse_predictor_and_backward_time():
    # 257 points per window: the initial guess comes from the same tableau on a grid 8x
    # coarser. Forward and backward in time, one window each way.
    solve = _deer("dopri5", num_points=257)
    seq = _sequential("dopri5")
    for t0, t1 in [(T0, T1), (T1, T0)]:
        y0 = Y0 if t0 == T0 else _reference_t1()
        ts = TS if t0 == T0 else TS[::-1]
        ys, state, result = solve(y0, t0, t1, t1 - t0, ts)
        assert result == diffrax.RESULTS.successful
        np.testing.assert_allclose(
            ys, seq(y0, t0, t1, (t1 - t0) / 256, ts), rtol=1e-10, atol=1e-10
        )
        assert int(state.total_coarse_iters) >= 1
        assert int(state.total_iters) <= 4


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("tsit5", 5)])
def test_convergence_order(name, order):
    # dy/dt = -y + sin(t), y(0) = 1 on [0, 10] (non-autonomous: checks the stage
    # times), against its closed form. Halve the grid spacing by doubling the windows
    # (same points per window). On Van der Pol 5th-order tableaus are still
    # pre-asymptotic (order ~5.8, as diffrax's sequential Tsit5) at these spacings.
    t1 = 10.0
    exact = 1.5 * jnp.exp(-t1) + (jnp.sin(t1) - jnp.cos(t1)) / 2
    ts = jnp.linspace(0.0, t1, TS.shape[0])
    errs = []
    for windows in (4, 8, 16):
        ys, _, result = _deer(name, vf=forced_decay)(jnp.array([1.0]), 0.0, t1, t1 / windows, ts)
        assert result == diffrax.RESULTS.successful
        errs.append(float(jnp.abs(ys[-1, 0] - exact)))
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(np.abs(orders - order) < 0.3), (errs, orders)


def test_order_and_error_order():
    term = diffrax.ODETerm(van_der_pol)
    for name, order, error_order in [
        ("euler", 1, 2),  # no embedded estimate: Richardson against the coarse grid
        ("heun", 2, 2),
        ("tsit5", 5, 5),
    ]:
        solver = DEER(discretisation=SOLVERS[name])
        assert solver.order(term) == order
        assert solver.error_order(term) == error_order
    assert DEER().order(term) == 2 and DEER().error_order(term) == 3


@ft.cache
def _adaptive():
    solver = DEER(num_points=N, discretisation=diffrax.Tsit5())

    @jax.jit
    def solve(tol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(van_der_pol), solver, 0.0, 10.0, None, Y0, args=MU,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=512,
        )
        return sol.ys[0], sol.solver_state, sol.result

    return solve


def test_pid_controller_adapts_windows():
    ref = reference_solution(van_der_pol, Y0, MU, 0.0, 10.0, jnp.array([10.0]))[0]
    windows, errs = [], []
    for tol in (1e-4, 1e-6, 1e-8):
        y1, state, result = _adaptive()(tol)
        assert result == diffrax.RESULTS.successful
        err = float(jnp.max(jnp.abs(y1 - ref)))
        # The window error is the sum of the steps' local error estimates: the global
        # error stays within a small multiple of the tolerance.
        assert err < 10 * tol, (tol, err)
        windows.append(int(state.num_windows))
        errs.append(err)
    assert 1 < windows[0] < windows[1] < windows[2], windows
    assert errs[0] > errs[1] > errs[2], errs


def test_failed_window_has_infinite_error():
    # One Newton iteration cannot converge on a 16-step window from a constant guess:
    # without the sequential fallback (which would complete the window exactly), the
    # step reports failure and an infinite error (so a controller shrinks it).
    solver = DEER(
        num_points=N, discretisation=diffrax.Tsit5(), max_iters=1,
        root_finder=ParallelNewton(sequential_fallback=False),
    )
    term = diffrax.ODETerm(van_der_pol)
    state = solver.init(term, T0, T1, Y0, MU)
    step = eqx.filter_jit(solver.step)
    _, y_error, _, _, result = step(term, T0, T1, Y0, MU, state, False)
    assert result != diffrax.RESULTS.successful
    assert bool(jnp.all(jnp.isinf(y_error)))


def test_unconverged_window_completed_sequentially():
    # The default sequential fallback: after one Newton iteration the rest of the
    # window's steps are taken one after another, so the window is Tsit5's own.
    solver = DEER(num_points=N, discretisation=diffrax.Tsit5(), max_iters=1)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(van_der_pol), solver, T0, T1, T1 - T0, Y0, args=MU,
        saveat=diffrax.SaveAt(ts=TS),
    )
    ref = _sequential("tsit5")(Y0, T0, T1, (T1 - T0) / (N - 1), TS)
    np.testing.assert_allclose(sol.ys, ref, rtol=1e-12, atol=1e-12)


#
# Gradients: those of the discrete solution.
#

_MLP = eqx.nn.MLP(2, 2, width_size=8, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
_PARAMS, _STATIC = eqx.partition(_MLP, eqx.is_inexact_array)
_G_T0, _G_T1 = 0.1, 1.7


def _neural_vf(t, y, params):
    return eqx.combine(params, _STATIC)(y) - 0.3 * y + 0.1 * jnp.sin(t)


def _loss(params, y0, solver, dt0, max_steps):
    # Two windows; values from dense output inside them and at t1.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_neural_vf), solver, _G_T0, _G_T1, dt0, y0, args=params,
        saveat=diffrax.SaveAt(ts=jnp.array([0.5, 1.0, 1.5]), t1=True), max_steps=max_steps,
    )
    return jnp.sum(sol.ys[:-1] ** 2) + jnp.sum(jnp.sin(sol.ys[-1]))


def test_gradients_exact():
    deer = ft.partial(
        _loss, solver=DEER(num_points=N, discretisation=diffrax.Tsit5(), **TIGHT),
        dt0=(_G_T1 - _G_T0) / 2, max_steps=2,
    )
    sequential = ft.partial(
        _loss, solver=diffrax.Tsit5(), dt0=(_G_T1 - _G_T0) / 32, max_steps=32
    )
    grad = jax.jit(jax.grad(deer, argnums=(0, 1)))
    g_params, g_y0 = grad(_PARAMS, Y0)
    # Against diffrax's sequential solve, differentiated through (discretise-then-
    # optimise): the same discrete solution, so the same gradients.
    s_params, s_y0 = jax.jit(jax.grad(sequential, argnums=(0, 1)))(_PARAMS, Y0)
    np.testing.assert_allclose(g_y0, s_y0, rtol=1e-9, atol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g_params), jax.tree_util.tree_leaves(s_params)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # Against central finite differences of DEER itself, along random directions.
    loss = jax.jit(deer)
    leaves, treedef = jax.tree_util.tree_flatten(_PARAMS)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    v_params = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    v_y0 = jnp.array([0.3, -0.7])
    eps = 1e-6

    def shifted(e):
        return jax.tree_util.tree_map(lambda p, v: p + e * v, _PARAMS, v_params)

    fd_params = (loss(shifted(eps), Y0) - loss(shifted(-eps), Y0)) / (2 * eps)
    fd_y0 = (loss(_PARAMS, Y0 + eps * v_y0) - loss(_PARAMS, Y0 - eps * v_y0)) / (2 * eps)
    dot_params = sum(
        jnp.sum(a * b)
        for a, b in zip(jax.tree_util.tree_leaves(g_params), jax.tree_util.tree_leaves(v_params))
    )
    np.testing.assert_allclose(dot_params, fd_params, rtol=1e-6)
    np.testing.assert_allclose(jnp.dot(g_y0, v_y0), fd_y0, rtol=1e-6)


#
# Bad input.
#


@pytest.mark.parametrize(
    "solver,match",
    [
        (diffrax.Kvaerno5(), "implicit"),
        (diffrax.ImplicitEuler(), "implicit"),
        (diffrax.KenCarp4(), "implicit"),
        (diffrax.ShARK(), "stochastic"),
        (diffrax.EulerHeun(), "not an explicit Runge--Kutta"),
        (diffrax.ReversibleHeun(), "not an explicit Runge--Kutta"),
        (diffrax.HalfSolver(diffrax.Tsit5()), "wrapped"),
        (DEER(), "not an explicit Runge--Kutta"),
        ("tsit5", "not a diffrax solver"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else x,
)
def test_unsupported_discretisations_raise(solver, match):
    with pytest.raises(TypeError, match=match):
        DEER(discretisation=solver)


def test_float32_as_accurate_as_the_sequential_solver():
    # In float32 the converged trajectory of a Runge--Kutta map is as close to the
    # truth as the sequential solver's on the same grid: each Newton step solves the
    # linear recurrence for the correction, whose scan rounds relative to the
    # correction (solving for the states, the scan's rounding accumulated along the
    # window: 3x the sequential rounding error here, 30x at T = 1e4).
    T = 4001
    # Rounding error: float32 against float64, same solver, same grid.
    err_deer = float32_rounding_error(DEER(num_points=T, discretisation=diffrax.Heun()), 5.0, T)
    err_sequential = float32_rounding_error(diffrax.Heun(), 5.0 / (T - 1), T)
    assert err_deer < 1.5 * err_sequential, (err_deer, err_sequential)
