"""Shared test problems and references."""

import functools as ft

import diffrax
import jax
import jax.numpy as jnp
import numpy as np


def van_der_pol(t, y, mu):
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def damped_pendulum(t, y, args):
    damping, gravity = args
    return jnp.stack([y[1], -damping * y[1] - gravity * jnp.sin(y[0])])


def cubic_decay(t, y, args):
    # A 3-D contractive system with nonlinear coupling.
    A = jnp.array([[-1.0, 0.5, 0.0], [-0.5, -1.0, 0.3], [0.0, -0.3, -0.5]])
    return A @ y - 0.5 * y**3


def lotka_volterra(t, y, args):
    a, b, c, d = 1.5, 1.0, 3.0, 1.0
    return jnp.stack([a * y[0] - b * y[0] * y[1], d * y[0] * y[1] - c * y[1]])


def forced_decay(t, y, args):
    # Non-autonomous: dy/dt = -y + sin(t).
    return -y + jnp.sin(t)


PROBLEMS = {
    # name: (vector field, y0, args, t0, t1)
    "van_der_pol": (van_der_pol, jnp.array([2.0, 0.0]), 1.0, 0.0, 5.0),
    "damped_pendulum": (damped_pendulum, jnp.array([1.0, 0.0]), (0.5, 9.81), 0.0, 20.0),
    "cubic_decay": (cubic_decay, jnp.array([1.0, -0.5, 0.8]), None, 0.0, 10.0),
    "lotka_volterra": (lotka_volterra, jnp.array([2.0, 1.0]), None, 0.0, 3.0),
    "forced_decay": (forced_decay, jnp.array([1.0]), None, 0.0, 10.0),
}


def logistic(t, y, args):
    return y * (1 - y)


# Dynamics that are not contractive along the way: plain DEER from a constant guess
# blows up on each (the reference implementation hits its clip).
HARD_PROBLEMS = {
    # name: (vector field, y0, args, t1)
    "logistic": (logistic, jnp.array([0.01]), None, 20.0),
    "lotka_volterra": (lotka_volterra, jnp.array([2.0, 1.0]), None, 10.0),
    "van_der_pol": (van_der_pol, jnp.array([2.0, 0.0]), 1.0, 20.0),
}


def brusselator(t, y, args):
    a, b = args
    x, v = y[0], y[1]
    return jnp.stack([a + x**2 * v - (b + 1) * x, b * x - x**2 * v])


def robertson(t, y, args):
    # Robertson's stiff chemical kinetics (rates spanning 0.04 to 3e7).
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack([
        -0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2
    ])


def lorenz(t, y, args):
    return jnp.stack([
        10.0 * (y[1] - y[0]), y[0] * (28.0 - y[2]) - y[1], y[0] * y[1] - 8.0 / 3.0 * y[2]
    ])


def two_body(t, y, args):
    q, p = y[:2], y[2:]
    return jnp.concatenate([p, -q / jnp.sum(q**2) ** 1.5])


# Oscillating, stiff and chaotic problems that `DEER()` solves in one window with its
# defaults (the sliding window of `ParallelNewton`), with whether they are stiff.
ONE_WINDOW_PROBLEMS = {
    # name: (vector field, y0, args, t1, stiff)
    **{name: (*HARD_PROBLEMS[name], False) for name in HARD_PROBLEMS},
    "brusselator": (brusselator, jnp.array([1.5, 3.0]), (1.0, 3.0), 20.0, False),
    "robertson": (robertson, jnp.array([1.0, 0.0, 0.0]), None, 40.0, True),
    "lorenz": (lorenz, jnp.array([1.0, 1.0, 1.0]), None, 8.0, False),
    "two_body": (two_body, jnp.array([1.0, 0.0, 0.0, 1.2]), None, 10.0, False),
}


def reference_solution(
    vector_field, y0, args, t0, t1, ts, rtol=1e-12, atol=1e-12, solver=diffrax.Tsit5()
):
    """High-accuracy sequential diffrax solution at `ts` (`solver=diffrax.Kvaerno5()`
    for stiff problems)."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        t0,
        t1,
        (t1 - t0) / 100,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=200_000,
    )
    return sol.ys


def float32_rounding_error(solver, dt0, num_points: int) -> float:
    """Van der Pol over [0, 5] with `solver` in float32, against the same solver in
    float64 on the same grid: the largest difference at 11 saved times."""

    def solve(dtype):
        f = lambda x: jnp.asarray(x, dtype)
        return diffrax.diffeqsolve(
            diffrax.ODETerm(van_der_pol), solver, f(0.0), f(5.0), f(dt0), f([2.0, 0.0]),
            args=f(1.0), saveat=diffrax.SaveAt(ts=f(jnp.linspace(0.0, 5.0, 11))),
            max_steps=num_points + 10,
        ).ys

    float32 = solve(jnp.float32)
    assert float32.dtype == jnp.float32
    return float(jnp.max(jnp.abs(float32 - solve(jnp.float64))))


def tree_allclose(x, y, rtol=1e-7, atol=1e-9):
    leaves_x = jax.tree_util.tree_leaves(x)
    leaves_y = jax.tree_util.tree_leaves(y)
    return len(leaves_x) == len(leaves_y) and all(
        bool(jnp.allclose(a, b, rtol=rtol, atol=atol)) for a, b in zip(leaves_x, leaves_y)
    )


@ft.cache
def random_key(seed: int = 0):
    return jax.random.PRNGKey(seed)


# An autoregressive GRU that generates a sine wave: its output is its next input, its
# hidden state circles a limit cycle (the rotation part of the candidate weights) around
# an unstable fixed point at 0. The largest Lyapunov exponent is ~0 (neutral phase):
# the hard regime for parallel evaluation.
def _gru_params():
    omega = 2 * np.pi / 50
    c, s = np.cos(omega), np.sin(omega)
    Wn = np.zeros((4, 4))
    Wn[:2, :2] = 1.1 * np.array([[c, -s], [s, c]])
    Wn[2:, 2:] = 0.55 * np.eye(2)
    return dict(
        Wz=0.1 * jnp.eye(4), bz=-3.0 * jnp.ones(4),
        Wr=0.1 * jnp.eye(4), br=3.0 * jnp.ones(4),
        Wn=jnp.asarray(Wn), Un=jnp.zeros((4, 1)).at[2, 0].set(0.3),
        Wo=jnp.zeros((1, 4)).at[0, 0].set(1.0),
    )


def sine_wave_gru():
    """`step(h, None) -> (h, y)` of the autoregressive sine-wave GRU (see above)."""
    p = _gru_params()

    def step(h, _):
        x = p["Wo"] @ h
        z = jax.nn.sigmoid(p["Wz"] @ h + p["bz"])
        r = jax.nn.sigmoid(p["Wr"] @ h + p["br"])
        n = jnp.tanh(p["Wn"] @ (r * h) + p["Un"] @ x)
        h = (1 - z) * n + z * h
        return h, p["Wo"] @ h

    return step
