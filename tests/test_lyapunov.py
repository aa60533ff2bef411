import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from diffrax_deer import expm, lyapunov_exponent


def test_linear_map_known_eigenvalues():
    # A non-normal matrix with eigenvalues 0.9 and 0.5: lambda = log 0.9 per step.
    A = jnp.array([[0.9, 2.0], [0.0, 0.5]])
    J = jnp.broadcast_to(A, (5000, 2, 2))
    np.testing.assert_allclose(lyapunov_exponent(J), np.log(0.9), atol=2e-3)
    # per unit time, with steps of 0.1
    np.testing.assert_allclose(lyapunov_exponent(J, dt=0.1), np.log(0.9) / 0.1, atol=2e-2)
    # an expanding one, with a product that would overflow float64 unnormalised
    J = jnp.broadcast_to(jnp.array([[3.0, 1.0], [0.0, 0.2]]), (5000, 2, 2))
    np.testing.assert_allclose(lyapunov_exponent(J), np.log(3.0), atol=2e-3)


def test_diagonal():
    J = jnp.stack([jnp.full(100, 0.5), jnp.full(100, -0.8)], axis=-1)
    np.testing.assert_allclose(lyapunov_exponent(J), np.log(0.8), rtol=1e-12)


def test_lorenz_largest_exponent():
    # The Lorenz system (sigma=10, rho=28, beta=8/3) has lambda ~ 0.906.
    def lorenz(t, y, args):
        x, yy, z = y
        return jnp.stack([10 * (yy - x), x * (28 - z) - yy, x * yy - 8 / 3 * z])

    dt, n = 0.01, 40_000
    ts = jnp.arange(n + 1) * dt
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lorenz), diffrax.Tsit5(), 0.0, float(ts[-1]), dt,
        jnp.array([-8.0, 8.0, 27.0]), saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10), max_steps=10**6,
    )
    ys = sol.ys[1000:]  # skip the transient
    mid = (ys[1:] + ys[:-1]) / 2
    jac = jax.vmap(jax.jacfwd(lambda y: lorenz(0.0, y, None)))(mid)
    flow = expm(jac * dt)  # Jacobian of the flow over one step
    lam = lyapunov_exponent(flow, dt=dt)
    assert abs(float(lam) - 0.906) < 0.08, lam


def test_solver_and_scan_diagnostics():
    import diffrax_deer

    # y' = M y with eigenvalues -0.5 and -2 (normal M): lambda = -0.5 per unit time.
    M = jnp.array([[-0.5, 0.0], [0.0, -2.0]])
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: M @ y),
        diffrax_deer.DEER(num_points=201, lyapunov=True),
        0.0, 8.0, 4.0, jnp.array([1.0, 1.0]),
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )
    state = sol.solver_state
    np.testing.assert_allclose(state.lyapunov_exponent, -0.5, atol=1e-8)
    np.testing.assert_allclose(state.lyapunov_time, 8.0)
    # Not asked for: NaN.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: M @ y), diffrax_deer.DEER(num_points=201),
        0.0, 8.0, 8.0, jnp.array([1.0, 1.0]), saveat=diffrax.SaveAt(solver_state=True, t1=True),
    )
    assert np.isnan(sol.solver_state.lyapunov_exponent)

    # scan: a contracting map h -> tanh(W h + x) with ||W|| < 1 has lambda < 0 per step.
    W = jnp.array([[0.5, -0.3], [0.3, 0.5]])
    xs = jnp.stack([jnp.sin(jnp.arange(500.0)), jnp.cos(jnp.arange(500.0))], axis=-1)
    f = lambda h, x: (jnp.tanh(W @ h + x), h)
    _, _, stats = diffrax_deer.scan(f, jnp.zeros(2), xs, return_stats=True, lyapunov=True)
    _, hs = jax.lax.scan(f, jnp.zeros(2), xs)
    jac = jax.vmap(jax.jacfwd(lambda h, x: f(h, x)[0]))(hs, xs)
    np.testing.assert_allclose(stats.lyapunov_exponent, lyapunov_exponent(jac), rtol=1e-6)
    assert float(stats.lyapunov_exponent) < np.log(np.sqrt(0.34)) + 1e-6
