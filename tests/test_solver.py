import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from diffrax_deer import DEER

from .helpers import (
    cubic_decay,
    float32_rounding_error,
    PROBLEMS,
    reference_solution,
    van_der_pol,
)


def _solve(vf, y0, args, t0, t1, solver, saveat, **kwargs):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(vf), solver, t0, t1, t1 - t0, y0, args=args, saveat=saveat,
        **kwargs,
    )


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_matches_tsit5_reference(name):
    vf, y0, args, t0, t1 = PROBLEMS[name]
    ts = jnp.linspace(t0, t1, 21)
    sol = _solve(
        vf, y0, args, t0, t1, DEER(num_points=2001),
        diffrax.SaveAt(ts=ts, solver_state=True),
    )
    ref = reference_solution(vf, y0, args, t0, t1, ts)
    assert sol.result == diffrax.RESULTS.successful
    scale = jnp.max(jnp.abs(ref))
    # 2nd order: relative error O(dt^2) with dt the grid spacing.
    dt = (t1 - t0) / 2000
    err = jnp.max(jnp.abs(sol.ys - ref)) / scale
    assert err < 2 * dt**2, err
    assert 1 <= int(sol.solver_state.total_iters) <= 60


def test_convergence_order_two():
    vf, y0, args, t0, t1 = PROBLEMS["van_der_pol"]
    ref = reference_solution(vf, y0, args, t0, t1, jnp.array([t1]))[0]
    errs = []
    ns = [101, 201, 401, 801]
    for n in ns:
        sol = _solve(vf, y0, args, t0, t1, DEER(num_points=n), diffrax.SaveAt(t1=True))
        errs.append(float(jnp.max(jnp.abs(sol.ys[0] - ref))))
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(np.abs(orders - 2) < 0.15), (errs, orders)


def test_linear_ode_is_exact():
    # y' = M y + c with constant M and c: the exponential scheme is exact on any grid.
    M = jnp.array([[-0.3, 2.0, 0.0], [-2.0, -0.3, 0.1], [0.0, 0.5, -1.5]])
    c = jnp.array([1.0, -0.5, 0.2])
    y0 = jnp.array([1.0, 0.0, -1.0])
    t1 = 3.0
    ts = jnp.linspace(0.0, t1, 7)
    sol = _solve(
        lambda t, y, args: M @ y + c, y0, None, 0.0, t1, DEER(num_points=5),
        diffrax.SaveAt(ts=ts),
    )
    # Closed form: y(t) = e^{Mt} y0 + M^{-1}(e^{Mt} - I) c.
    expm = jax.vmap(lambda t: jax.scipy.linalg.expm(M * t))(ts)
    exact = jnp.einsum("tij,j->ti", expm, y0) + jnp.linalg.solve(
        M, jnp.einsum("tij,j->ti", expm - jnp.eye(3)[None], c).T
    ).T
    # Grid points are exact to round-off; between them Hermite interpolation is used,
    # so compare at the grid (ts here are a subset of the grid only at 0 and t1).
    np.testing.assert_allclose(sol.ys[0], exact[0], atol=1e-14)
    np.testing.assert_allclose(sol.ys[-1], exact[-1], rtol=1e-12, atol=1e-12)


def test_linear_ode_grid_values_exact_many_windows():
    # Several chained windows: every window end is a grid point.
    lam = -0.7
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: lam * y + jnp.cos(0.0 * t)),
        DEER(num_points=3), 0.0, 2.0, 0.25, jnp.array([1.0]),
        saveat=diffrax.SaveAt(steps=True, solver_state=True),
    )
    n = int(sol.stats["num_steps"])
    assert n == 8
    ts = sol.ts[:n]
    exact = jnp.exp(lam * ts) + (jnp.exp(lam * ts) - 1) / lam
    np.testing.assert_allclose(sol.ys[:n, 0], exact, rtol=1e-12)
    assert int(sol.solver_state.num_windows) == 8


def test_pytree_state_and_backward_time():
    def vf(t, y, args):
        return {"x": y["v"], "v": -y["x"] - 0.1 * y["v"] ** 3, "m": -y["m"] * t}

    y0 = {"x": jnp.array(1.0), "v": jnp.array(0.0), "m": jnp.ones((2, 2))}

    def flat(y):
        return jnp.concatenate([y["x"][None], y["v"][None], y["m"].reshape(-1)])

    def vf_flat(t, z, args):
        out = vf(t, {"x": z[0], "v": z[1], "m": z[2:].reshape(2, 2)}, args)
        return flat(out)

    for t0, t1 in [(0.0, 4.0), (4.0, 0.0)]:
        ts = jnp.linspace(t0, t1, 9)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), DEER(num_points=1001), t0, t1, t1 - t0, y0,
            saveat=diffrax.SaveAt(ts=ts),
        )
        ref = reference_solution(vf_flat, flat(y0), None, t0, t1, ts)
        assert sol.ys["m"].shape == (9, 2, 2)
        got = jax.vmap(flat)(sol.ys)
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_backward_time_matches_forward():
    vf, y0, args, _, _ = PROBLEMS["van_der_pol"]
    fwd = _solve(vf, y0, args, 0.0, 2.0, DEER(num_points=401), diffrax.SaveAt(t1=True))
    back = _solve(vf, fwd.ys[0], args, 2.0, 0.0, DEER(num_points=401), diffrax.SaveAt(t1=True))
    np.testing.assert_allclose(back.ys[0], y0, atol=1e-4)
    ref = reference_solution(vf, fwd.ys[0], args, 2.0, 0.0, jnp.array([0.0]))
    np.testing.assert_allclose(back.ys[0], ref[0], atol=1e-4)


def test_vmap_and_jit_over_y0_and_args():
    vf = van_der_pol
    y0s = jnp.array([[2.0, 0.0], [1.0, 1.0], [-0.5, 0.3]])
    mus = jnp.array([0.5, 1.0, 1.5])

    @jax.jit
    def solve(y0, mu):
        return _solve(vf, y0, mu, 0.0, 3.0, DEER(num_points=501), diffrax.SaveAt(t1=True)).ys[0]

    batched = jax.vmap(solve)(y0s, mus)
    for i in range(3):
        ref = reference_solution(vf, y0s[i], mus[i], 0.0, 3.0, jnp.array([3.0]))[0]
        np.testing.assert_allclose(batched[i], ref, atol=1e-4)
        np.testing.assert_allclose(batched[i], solve(y0s[i], mus[i]), atol=1e-10)


def test_float32():
    vf, y0, args, t0, t1 = PROBLEMS["damped_pendulum"]
    y0 = y0.astype(jnp.float32)
    ts = jnp.linspace(t0, t1, 11, dtype=jnp.float32)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), DEER(num_points=2001), jnp.float32(t0), jnp.float32(t1),
        jnp.float32(t1 - t0), y0, args=args, saveat=diffrax.SaveAt(ts=ts),
    )
    assert sol.ys.dtype == jnp.float32
    assert sol.result == diffrax.RESULTS.successful
    ref = reference_solution(vf, y0.astype(jnp.float64), args, t0, t1, ts.astype(jnp.float64))
    np.testing.assert_allclose(sol.ys, ref, atol=2e-4)


def test_dense_output_and_derivative():
    vf, y0, args, t0, t1 = PROBLEMS["van_der_pol"]
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), DEER(num_points=1001), t0, t1, (t1 - t0) / 2, y0,
        args=args, saveat=diffrax.SaveAt(dense=True), max_steps=4,
    )
    ts = jnp.linspace(t0, t1, 37)
    ys = jax.vmap(sol.evaluate)(ts)
    ref = reference_solution(vf, y0, args, t0, t1, ts)
    np.testing.assert_allclose(ys, ref, atol=2e-4)
    dys = jax.vmap(sol.derivative)(ts)
    np.testing.assert_allclose(dys, jax.vmap(lambda y: vf(0.0, y, args))(ref), atol=2e-3)
    # Between grid points the interpolant keeps the scheme's accuracy: compare the
    # interpolated value with a fine-grid solution at an off-grid time.
    t_off = 0.4 * (t1 - t0) / 1000 * 3.3
    np.testing.assert_allclose(
        sol.evaluate(t_off), reference_solution(vf, y0, args, t0, t1, jnp.array([t_off]))[0], atol=1e-6
    )


def test_diagonal_jacobian_quasi_deer():
    vf, y0, args, t0, t1 = PROBLEMS["cubic_decay"]
    ts = jnp.linspace(t0, t1, 11)
    sol = _solve(
        vf, y0, args, t0, t1, DEER(num_points=2001, method="quasi-deer"),
        diffrax.SaveAt(ts=ts, solver_state=True),
    )
    ref = reference_solution(vf, y0, args, t0, t1, ts)
    assert sol.result == diffrax.RESULTS.successful
    np.testing.assert_allclose(sol.ys, ref, atol=5e-5)


def test_iterations_independent_of_grid_size():
    # Contractive dynamics: Newton iterations do not grow with the number of points.
    iters = {}
    for n in [1_000, 100_000]:
        sol = _solve(
            cubic_decay, PROBLEMS["cubic_decay"][1], None, 0.0, 10.0, DEER(num_points=n),
            diffrax.SaveAt(t1=True, solver_state=True),
        )
        assert sol.result == diffrax.RESULTS.successful
        iters[n] = int(sol.solver_state.total_iters)
    assert abs(iters[1_000] - iters[100_000]) <= 2, iters
    # The coarse-grid predictor (one level of 2048 intervals at T = 1e5): 1-3 iterations.
    assert iters[100_000] <= 3, iters


def test_stats_readable():
    vf, y0, args, t0, t1 = PROBLEMS["van_der_pol"]
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), DEER(num_points=201), t0, t1, (t1 - t0) / 4, y0, args=args,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )
    state = sol.solver_state
    assert int(state.num_windows) == 4
    assert int(state.max_window_iters) >= int(state.last_window_iters) >= 1
    assert int(state.total_iters) >= 4
    assert float(state.last_update_norm) <= 1.0


#
# Failures and bad input.
#


def test_nonconvergence_is_reported():
    vf, y0, args, t0, t1 = PROBLEMS["van_der_pol"]
    solver = DEER(num_points=201, max_iters=2)
    sol = _solve(vf, y0, args, t0, t1, solver, diffrax.SaveAt(t1=True), throw=False)
    assert sol.result == diffrax.RESULTS.nonlinear_max_steps_reached
    with pytest.raises(Exception, match="maximum number of steps"):
        _solve(vf, y0, args, t0, t1, solver, diffrax.SaveAt(t1=True))


def test_divergence_is_reported():
    # Finite-time blow-up: y' = y^2 from y0 = 1 explodes at t = 1.
    sol = _solve(
        lambda t, y, args: y**2, jnp.array([1.0]), None, 0.0, 2.0, DEER(num_points=101),
        diffrax.SaveAt(t1=True), throw=False,
    )
    assert sol.result != diffrax.RESULTS.successful


def test_nonfinite_y0_raises():
    with pytest.raises(Exception, match="non-finite"):
        _solve(
            van_der_pol, jnp.array([jnp.nan, 0.0]), 1.0, 0.0, 1.0, DEER(num_points=11),
            diffrax.SaveAt(t1=True),
        )


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="num_points"):
        DEER(num_points=1)
    with pytest.raises(ValueError, match="method"):
        DEER(method="full")
    with pytest.raises(ValueError, match="rtol"):
        DEER(rtol=-1.0)
    with pytest.raises(ValueError, match="max_iters"):
        DEER(max_iters=0)


def test_unsupported_terms_raise():
    y0 = jnp.array([1.0])
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(1,), key=jax.random.PRNGKey(0))
    sde = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y),
        diffrax.ControlTerm(lambda t, y, args: jnp.eye(1), bm),
    )
    with pytest.raises(TypeError, match="ODETerm"):
        diffrax.diffeqsolve(sde, DEER(num_points=11), 0.0, 1.0, 1.0, y0)
    control = diffrax.ControlTerm(
        lambda t, y, args: jnp.eye(1), diffrax.LinearInterpolation(jnp.array([0.0, 1.0]), jnp.ones((2, 1)))
    )
    with pytest.raises(TypeError, match="ODETerm"):
        diffrax.diffeqsolve(control, DEER(num_points=11), 0.0, 1.0, 1.0, y0)


def test_complex_state_raises():
    with pytest.raises(TypeError, match="real floating"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: 1j * y), DEER(num_points=11), 0.0, 1.0,
            1.0, jnp.array([1.0 + 0j]),
        )


def test_backsolve_adjoint_raises():
    def loss(y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y), DEER(num_points=11), 0.0, 1.0, 1.0,
            y0, adjoint=diffrax.BacksolveAdjoint(),
        ).ys[0, 0]

    with pytest.raises(NotImplementedError, match="BacksolveAdjoint"):
        jax.grad(loss)(jnp.array([1.0]))


def test_custom_norm():
    vf, y0, args, t0, t1 = PROBLEMS["damped_pendulum"]
    sol = _solve(
        vf, y0, args, t0, t1, DEER(num_points=501, norm=optx.rms_norm, rtol=1e-10, atol=1e-10),
        diffrax.SaveAt(t1=True),
    )
    assert sol.result == diffrax.RESULTS.successful


@pytest.mark.parametrize("method", ["deer", "quasi-deer"])
def test_float32_as_accurate_as_a_sequential_solver(method):
    # In float32 on a fine grid, e^{J dt} is the identity plus a small increment whose
    # rounding next to the identity is nearly the same from one point to the next; the
    # Newton step is solved for the correction, with the residual written in increments,
    # so it does not add up along the window (it did: here 4x the rounding error of
    # diffrax's Heun on the same grid; at T = 1e4 an error of 4.3e-4, 100x Heun's).
    # Quasi-DEER converges linearly: its error is the float32 tolerance's.
    T = 4001
    # Rounding error: float32 against float64, same solver, same grid.
    err_deer = float32_rounding_error(DEER(num_points=T, method=method), 5.0, T)
    err_sequential = float32_rounding_error(diffrax.Heun(), 5.0 / (T - 1), T)
    bound = 1.5 * err_sequential if method == "deer" else 1e-4
    assert err_deer < bound, (err_deer, err_sequential)
