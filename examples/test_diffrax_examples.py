"""Smoke tests: small versions of the scenarios of diffrax's ODE examples (neural ODE,
Kalman filter, steady state, stiff ODE, continuous normalising flow, latent ODE), each
run with `diffrax_deer.DEER` in place of the sequential solver the example uses, and
checked against that solver: values and gradients agree to DEER's grid accuracy.

Written in this project's own words (the examples are the scenario, not the code).
Run by `.ci/run` (`python -m pytest examples`), apart from the unit tests because each
scenario compiles a training step twice.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
from diffrax_deer import DEER


jax.config.update("jax_enable_x64", True)


def _mlp(n_in, n_out, key, width=8):
    mlp = eqx.nn.MLP(n_in, n_out, width, depth=1, activation=jnp.tanh, key=key)
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_array(x) else x, mlp)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _close(a, b, rtol):
    a, b = _flat(a), _flat(b)
    scale = max(float(jnp.max(jnp.abs(b))), 1e-12)
    err = float(jnp.max(jnp.abs(a - b))) / scale
    assert err < rtol, err


def _sgd(params, grads, lr):
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)


def test_neural_ode_training():
    # Fit a neural ODE to trajectories of a damped spiral; three SGD steps with each
    # solver from the same initial model: the losses and gradients agree.
    ts = jnp.linspace(0.0, 2.0, 20)
    y0s = jr.normal(jr.PRNGKey(0), (4, 2))
    A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])
    data = jax.vmap(lambda y0: jax.vmap(lambda t: jax.scipy.linalg.expm(A * t) @ y0)(ts))(y0s)
    model = _mlp(2, 2, jr.PRNGKey(1))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def make_loss(solver, dt0):
        def loss(params):
            mlp = eqx.combine(params, static)
            term = diffrax.ODETerm(lambda t, y, args: mlp(y))

            def one(y0):
                return diffrax.diffeqsolve(
                    term, solver, ts[0], ts[-1], dt0, y0, saveat=diffrax.SaveAt(ts=ts),
                    stepsize_controller=diffrax.ConstantStepSize(),
                ).ys

            return jnp.mean((jax.vmap(one)(y0s) - data) ** 2)

        return jax.jit(jax.value_and_grad(loss))

    deer = make_loss(DEER(num_points=401), ts[-1] - ts[0])
    tsit5 = make_loss(diffrax.Tsit5(), 0.01)
    p_deer = p_tsit5 = params
    for _ in range(3):
        (l_deer, g_deer), (l_tsit5, g_tsit5) = deer(p_deer), tsit5(p_tsit5)
        np.testing.assert_allclose(l_deer, l_tsit5, rtol=1e-4)
        _close(g_deer, g_tsit5, 1e-3)
        p_deer, p_tsit5 = _sgd(p_deer, g_deer, 0.5), _sgd(p_tsit5, g_tsit5, 0.5)


def test_kalman_filter_noise_gradients():
    # A Kalman-Bucy filter for a noisy oscillator: the estimate and the Riccati equation
    # of its covariance (a PyTree state) are integrated together; gradients with
    # respect to the noise covariances Q (inside the ODE), R (inside, through the gain)
    # and a weight outside the ODE.
    A = jnp.array([[0.0, 1.0], [-1.0, -0.2]])
    C = jnp.array([[1.0, 0.0]])
    ts = jnp.linspace(0.0, 5.0, 26)

    def observation(t):
        return jnp.sin(t)[None]

    def vf(t, state, args):
        Q, R = args
        x, P = state
        K = P @ C.T / R
        dx = A @ x + K @ (observation(t) - C @ x)
        dP = A @ P + P @ A.T + Q - K @ C @ P
        return dx, dP

    def make_loss(solver, dt0):
        def loss(Q_diag, R, weight):
            state0 = (jnp.zeros(2), jnp.eye(2))
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(vf), solver, ts[0], ts[-1], dt0, state0,
                args=(jnp.diag(Q_diag), R), saveat=diffrax.SaveAt(ts=ts),
            )
            x = sol.ys[0]
            return weight * jnp.mean((x[:, 0] - jnp.sin(ts)) ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    args = (jnp.array([0.1, 0.3]), jnp.array(0.5), jnp.array(2.0))
    l_deer, g_deer = make_loss(DEER(num_points=801), 5.0)(*args)
    l_tsit5, g_tsit5 = make_loss(diffrax.Tsit5(), 0.01)(*args)
    np.testing.assert_allclose(l_deer, l_tsit5, rtol=1e-4)
    _close(g_deer, g_tsit5, 1e-3)


def test_steady_state_with_implicit_adjoint():
    # Integrate to a steady state (an event on the vector field's size) and
    # differentiate the steady state by `ImplicitAdjoint`: y* = theta, dy*/dtheta = I.
    def vf(t, y, theta):
        return -(y - theta) * (1 + (y - theta) ** 2)

    event = diffrax.Event(diffrax.steady_state_event(rtol=1e-8, atol=1e-8, norm=optx.rms_norm))

    def steady(theta, solver, controller=diffrax.ConstantStepSize()):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), solver, 0.0, jnp.inf, 2.0, jnp.array([1.0, -1.0]),
            args=theta, event=event, adjoint=diffrax.ImplicitAdjoint(), max_steps=512,
            stepsize_controller=controller,
        )
        return sol.ys[-1]

    theta = jnp.array([0.3, 0.7])
    y_deer = steady(theta, DEER(num_points=65))  # windows of 2 time units
    y_tsit5 = steady(theta, diffrax.Tsit5(), diffrax.PIDController(rtol=1e-8, atol=1e-8))
    np.testing.assert_allclose(y_deer, theta, atol=1e-6)
    np.testing.assert_allclose(y_deer, y_tsit5, atol=1e-6)
    jac = jax.jit(jax.jacrev(lambda th: steady(th, DEER(num_points=65))))(theta)
    np.testing.assert_allclose(jac, jnp.eye(2), atol=1e-6)


def test_stiff_robertson():
    # Robertson's stiff kinetics (the example solves it with Kvaerno5): DEER's
    # exponential scheme takes the stiff linear part exactly; adaptive windows.
    def robertson(t, y, args):
        k1, k2, k3 = args
        return jnp.stack([
            -k1 * y[0] + k3 * y[1] * y[2],
            k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2],
            k2 * y[1] ** 2,
        ])

    args = (0.04, 3e7, 1e4)
    y0 = jnp.array([1.0, 0.0, 0.0])
    ts = jnp.array([0.1, 1.0, 10.0])
    ref = diffrax.diffeqsolve(
        diffrax.ODETerm(robertson), diffrax.Kvaerno5(), 0.0, 10.0, 1e-4, y0, args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12),
    ).ys
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(robertson), DEER(num_points=65), 0.0, 10.0, 10.0, y0, args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-9), max_steps=1024,
    )
    np.testing.assert_allclose(sol.ys, ref, rtol=1e-3, atol=1e-8)


def test_continuous_normalising_flow_log_likelihood():
    # A continuous normalising flow on 2-D data: the state carries the sample and the
    # log-density change (exact trace of the Jacobian); log-likelihood and its gradient
    # with respect to the flow's network.
    model = _mlp(3, 2, jr.PRNGKey(2))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    data = jr.normal(jr.PRNGKey(3), (8, 2)) * jnp.array([[1.0, 0.5]])

    def make_loss(solver, dt0):
        def loss(params):
            net = eqx.combine(params, static)

            def vf(t, state, args):
                z, _ = state
                f = lambda z: net(jnp.concatenate([z, t[None]]))
                return f(z), -jnp.trace(jax.jacfwd(f)(z))

            def one(x):
                sol = diffrax.diffeqsolve(
                    diffrax.ODETerm(vf), solver, 1.0, 0.0, dt0, (x, jnp.array(0.0)),
                )
                z, delta = sol.ys[0][-1], sol.ys[1][-1]
                return -0.5 * jnp.sum(z**2) - jnp.log(2 * jnp.pi) - delta

            return -jnp.mean(jax.vmap(one)(data))

        return jax.jit(jax.value_and_grad(loss))

    l_deer, g_deer = make_loss(DEER(num_points=201), -1.0)(params)
    l_tsit5, g_tsit5 = make_loss(diffrax.Tsit5(), -0.01)(params)
    np.testing.assert_allclose(l_deer, l_tsit5, rtol=1e-5)
    _close(g_deer, g_tsit5, 1e-4)


def test_latent_ode_training_step():
    # A latent ODE: a GRU encodes irregularly sampled observations (backwards in time)
    # into a latent initial state, decoded by a neural ODE over the observation times
    # with dt0 = t1 - t0 (whose end may round: float32 times, as the example uses).
    key = jr.PRNGKey(4)
    kt, ky, kg, kf, kd = jr.split(key, 5)
    ts = jnp.sort(jr.uniform(kt, (12,), jnp.float32, 0.1, 3.0))
    ys = jnp.stack([jnp.sin(ts), jnp.cos(ts)], axis=-1)
    f32 = lambda m: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if eqx.is_array(x) else x, m)
    gru = f32(eqx.nn.GRUCell(3, 4, key=kg))
    func = f32(eqx.nn.MLP(4, 4, 8, depth=1, activation=jnp.tanh, key=kf))
    decoder = f32(eqx.nn.Linear(4, 2, key=kd))
    model = (gru, func, decoder)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def make_loss(solver, dt0):
        def loss(params):
            gru, func, decoder = eqx.combine(params, static)
            inputs = jnp.concatenate([ys, ts[:, None]], axis=-1)[::-1]
            h = jax.lax.scan(lambda h, x: (gru(x, h), None), jnp.zeros(4, jnp.float32), inputs)[0]
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, z, args: func(z)), solver, ts[0], ts[-1],
                dt0(ts), h, saveat=diffrax.SaveAt(ts=ts),
            )
            pred = jax.vmap(decoder)(sol.ys)
            return jnp.mean((pred - ys) ** 2)

        return jax.jit(jax.value_and_grad(loss))

    l_deer, g_deer = make_loss(DEER(num_points=301), lambda ts: ts[-1] - ts[0])(params)
    l_tsit5, g_tsit5 = make_loss(diffrax.Tsit5(), lambda ts: jnp.asarray(0.05, jnp.float32))(params)
    assert bool(jnp.isfinite(l_deer)) and bool(jnp.all(jnp.isfinite(_flat(g_deer))))
    np.testing.assert_allclose(l_deer, l_tsit5, rtol=1e-3)
    _close(g_deer, g_tsit5, 1e-2)
