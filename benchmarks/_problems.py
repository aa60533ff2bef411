"""The ODEs the benchmarks solve.

Every problem is autonomous, `dy/dt = f(t, y, args)` with a flat state `y` of shape
`(D,)` and `args` a PyTree of arrays (so that parameters are traced inputs of the
compiled programs, not constants folded into them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    vf: Callable[[Any, jax.Array, Any], jax.Array]  # f(t, y, args)
    y0: jax.Array
    args: Any
    t0: float
    t1: float

    @property
    def dim(self) -> int:
        return int(self.y0.shape[0])

    def reference_func(self, y, x, params):
        """The signature of the DEER reference implementation: `func(y, x, params)`."""
        del x
        return self.vf(0.0, y, params)


# --------------------------------------------------------------------------------------
# Small classical ODEs
# --------------------------------------------------------------------------------------


def _van_der_pol(t, y, mu):
    x, v = y[0], y[1]
    return jnp.stack([v, mu * (1 - x**2) * v - x])


def van_der_pol() -> Problem:
    """Van der Pol oscillator, mu = 1, on [0, 5] (D = 2)."""
    return Problem("vdp", _van_der_pol, jnp.array([2.0, 0.0]), jnp.array(1.0), 0.0, 5.0)


def _pendulum(t, y, args):
    damping, g = args
    theta, omega = y[0], y[1]
    return jnp.stack([omega, -g * jnp.sin(theta) - damping * omega])


def damped_pendulum() -> Problem:
    """Damped pendulum theta'' = -g sin(theta) - 0.5 theta', g = 9.81, on [0, 20]."""
    args = (jnp.array(0.5), jnp.array(9.81))
    return Problem("pendulum", _pendulum, jnp.array([1.0, 0.0]), args, 0.0, 20.0)


def _cubic(t, y, A):
    return A @ y - 0.5 * y**3


def cubic_decay() -> Problem:
    """dy/dt = A y - 0.5 y^3 with a fixed 3x3 A (stable linear part), on [0, 10]."""
    A = jnp.array([[-1.0, 0.5, 0.0], [-0.5, -1.0, 0.3], [0.0, -0.3, -0.5]])
    return Problem("cubic3", _cubic, jnp.array([1.0, -1.0, 0.5]), A, 0.0, 10.0)


# --------------------------------------------------------------------------------------
# Neural ODE
# --------------------------------------------------------------------------------------


def mlp_ode(dim: int, *, width: int = 64, depth: int = 2, seed: int = 0,
            lipschitz: float = 0.9, t1: float = 10.0) -> Problem:
    """Neural-ODE vector field `f(y) = mlp(y) - y` with an `equinox.nn.MLP` (tanh,
    `width` x `depth` hidden layers).

    Each linear layer's weight is rescaled to spectral norm `lipschitz ** (1/layers)`,
    so `mlp` is `lipschitz`-Lipschitz (tanh is 1-Lipschitz) and the dynamics contract
    at rate at least `1 - lipschitz`: a typical trained-and-regularised neural ODE,
    and the regime where DEER needs few Newton iterations.
    """
    mkey, ykey = jr.split(jr.PRNGKey(seed))
    mlp = eqx.nn.MLP(dim, dim, width, depth, activation=jax.nn.tanh, key=mkey)
    mlp = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_array(x) else x, mlp)
    scale = lipschitz ** (1 / len(mlp.layers))

    def rescale(layer):
        return eqx.tree_at(
            lambda l: l.weight, layer, layer.weight * scale / jnp.linalg.norm(layer.weight, 2)
        )

    mlp = eqx.tree_at(lambda m: m.layers, mlp, tuple(rescale(l) for l in mlp.layers))
    # Parameters travel as `args` (arrays only); the static part (activation etc.) is
    # closed over.
    params, static = eqx.partition(mlp, eqx.is_array)

    def vf(t, y, params):
        return eqx.combine(params, static)(y) - y

    y0 = jr.normal(ykey, (dim,), jnp.float64)
    return Problem(f"mlp{dim}", vf, y0, params, 0.0, t1)


def classical_problems() -> list[Problem]:
    return [van_der_pol(), damped_pendulum(), cubic_decay()]
