r"""Predictability: the largest Lyapunov exponent of a trajectory, from its Jacobians.

For a recurrence $s_k = f_k(s_{k-1})$ with Jacobians $J_k = \partial f_k / \partial
s_{k-1}$ along a trajectory, the largest Lyapunov exponent is

$$\lambda = \lim_{T \to \infty} \frac{1}{T \Delta} \log \| J_T J_{T-1} \cdots J_1 \|,$$

(per unit time when each step spans a time $\Delta$; per step when $\Delta = 1$). Nearby
trajectories separate like $e^{\lambda t}$.

Why it matters here (Gonzalez, Kozachkov et al., 2025): the residual whose root Newton
seeks has a conditioning controlled by $\lambda$. With $\lambda < 0$ (predictable,
contractive dynamics) it is bounded independently of the sequence length, and DEER
converges in a few iterations however long the sequence. With $\lambda > 0 $
(unpredictable, chaotic) it degrades like $e^{-\lambda T}$: Newton needs many
iterations (up to $T$), so evaluate sequentially, or in windows shorter than a few
$1/\lambda$.

The product is computed in parallel, as an associative scan over normalised matrices
with their log-scales, so it neither overflows nor underflows.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._batched import matmul
from ._linear_recurrence import associative_scan
from ._sharding import TimeSharding


def _normalise(M):
    size = jnp.max(jnp.abs(M), axis=(-2, -1))
    safe = jnp.where(size > 0, size, 1)
    return M / safe[..., None, None], jnp.log(size)


def _combine(earlier, later):
    M_i, log_i = earlier
    M_j, log_j = later
    P, log_p = _normalise(matmul(M_j, M_i))
    return P, log_i + log_j + log_p


def lyapunov_exponent(
    jacobians: Float[Array, "T D D"] | Float[Array, "T D"], dt: float = 1.0
) -> Float[Array, ""]:
    r"""Estimate of the largest Lyapunov exponent $\lambda$ (see the module docs) from
    the Jacobians of a trajectory's steps.

    **Arguments:**

    - `jacobians`: $J_1, \dots, J_T$, dense `(T, D, D)` or diagonal `(T, D)`.
    - `dt`: time spanned by one step, to express $\lambda$ per unit time; 1 for per
        step.

    **Returns:**

    $\frac{1}{T\,\Delta} \log \|J_T \cdots J_1\|$ (max-abs norm), a scalar. It
    converges to $\lambda$ as $T$ grows, with an $O(1/T)$ bias from the norm's constant.
    Negative: predictable, parallel (DEER) evaluation pays off. Positive: chaotic, prefer
    sequential evaluation or short windows.

    !!! example

        ```python
        J = jnp.broadcast_to(jnp.diag(jnp.array([0.5, 0.9])), (1000, 2, 2))
        diffrax_deer.lyapunov_exponent(J)        # log(0.9) = -0.105
        ```
    """
    return sharded_lyapunov_exponent(jacobians, dt, None)


def sharded_lyapunov_exponent(
    jacobians: Float[Array, "T D D"] | Float[Array, "T D"], dt, sharding: TimeSharding | None
) -> Float[Array, ""]:
    """[`diffrax_deer.lyapunov_exponent`][], its product's scan sharded by
    `sharding` (see `_sharding.py`) unless None."""
    T = jacobians.shape[0]
    if jacobians.ndim == 2:
        # Diagonal: each component grows independently.
        growth = jnp.sum(jnp.log(jnp.abs(jacobians)), axis=0)
        return jnp.max(growth) / (T * dt)
    M, log_scale = _normalise(jacobians)
    P, log_total = associative_scan(_combine, (M, log_scale), sharding=sharding)
    log_norm = log_total[-1] + jnp.log(jnp.max(jnp.abs(P[-1])))
    return log_norm / (T * dt)
