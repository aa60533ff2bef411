"""Shared test problems and references."""

import functools as ft

import diffrax
import jax
import jax.numpy as jnp


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


def reference_solution(vector_field, y0, args, t0, t1, ts, rtol=1e-12, atol=1e-12):
    """High-accuracy sequential diffrax solution at `ts`."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Tsit5(),
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


def tree_allclose(x, y, rtol=1e-7, atol=1e-9):
    leaves_x = jax.tree_util.tree_leaves(x)
    leaves_y = jax.tree_util.tree_leaves(y)
    return len(leaves_x) == len(leaves_y) and all(
        bool(jnp.allclose(a, b, rtol=rtol, atol=atol)) for a, b in zip(leaves_x, leaves_y)
    )


@ft.cache
def random_key(seed: int = 0):
    return jax.random.PRNGKey(seed)
