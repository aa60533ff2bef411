r"""Damped (Levenberg--Marquardt) trajectory updates as a parallel Kalman smoother.

ELK (Gonzalez et al., NeurIPS 2024) replaces the Newton update of DEER by the minimiser
of the linearised residual plus a trust-region penalty:

$$\min_{s_1..s_T}\ \sum_k \| s_k - A_k s_{k-1} - b_k \|^2
    + \lambda \sum_k \| s_k - o_k \|^2, \qquad s_0 = x_0 \text{ given},$$

where $o_k$ is the current iterate. With $\lambda = 0$ this is DEER's linear recurrence;
as $\lambda \to \infty$ the update stays at $o$. The minimiser is the posterior mean
(smoothed mean) of the linear-Gaussian state-space model

$$s_k = A_k s_{k-1} + b_k + w_k,\ w_k \sim N(0, I), \qquad
  o_k = s_k + v_k,\ v_k \sim N(0, \lambda^{-1} I),$$

computed here in parallel over $k$ in three steps:

1. the filtering covariances $P_k$ (a Riccati recursion, independent of the data), by an
   associative scan over the covariance part of the parallel-filter elements of
   Särkkä & García-Fernández (2021);
2. the filtered means, a *linear* recurrence with the Kalman gains
   $K_k = P^-_k (P^-_k + \lambda^{-1} I)^{-1}$:
   $m_k = (I - K_k)(A_k m_{k-1} + b_k) + K_k o_k$;
3. the smoothed means (Rauch--Tung--Striebel), another linear recurrence run backwards:
   $m^s_k = m_k + E_k (m^s_{k+1} - A_{k+1} m_k - b_{k+1})$,
   $E_k = P_k A_{k+1}^\top (P^-_{k+1})^{-1}$.

Steps 2 and 3 are [`diffrax_deer.linear_recurrence`][] calls. With diagonal $A_k$
(quasi-ELK) every matrix is diagonal and everything is elementwise, $O(TD)$.
"""

import functools as ft

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._batched import identity_like, matmul, matvec, solve
from ._linear_recurrence import associative_scan, solve_linear_recurrence
from ._sharding import TimeSharding


def _transpose(M, diagonal):
    return M if diagonal else jnp.swapaxes(M, -1, -2)


def _solve(M, B, diagonal):
    """`M^{-1} B`, batched; elementwise for diagonal `M`."""
    return B / M if diagonal else solve(M, B)


def _mul(A, B, diagonal):
    return A * B if diagonal else matmul(A, B)


def _eye_like(M, diagonal):
    if diagonal:
        return jnp.ones_like(M)
    return identity_like(M)


def _riccati_combine(earlier, later, *, diagonal):
    """Covariance part (A, C, J) of the parallel Kalman filter's associative operator
    (Särkkä & García-Fernández, 2021):

    A = A_j (I + C_i J_j)^{-1} A_i,
    C = A_j (I + C_i J_j)^{-1} C_i A_j^T + C_j,
    J = A_i^T (I + J_j C_i)^{-1} J_j A_i + J_i.
    """
    A_i, C_i, J_i = earlier
    A_j, C_j, J_j = later
    T = ft.partial(_transpose, diagonal=diagonal)
    mul = ft.partial(_mul, diagonal=diagonal)
    M = _eye_like(A_i, diagonal) + mul(C_i, J_j)
    A_jM = T(_solve(T(M), T(A_j), diagonal))  # A_j M^{-1}
    A = mul(A_jM, A_i)
    C = mul(mul(A_jM, C_i), T(A_j)) + C_j
    # (I + J_j C_i)^{-1} J_j = M^{-T} J_j for symmetric C and J.
    J = mul(mul(T(A_i), _solve(T(M), J_j, diagonal)), A_i) + J_i
    if not diagonal:  # symmetrise against round-off
        C = (C + T(C)) / 2
        J = (J + T(J)) / 2
    return A, C, J


def filtered_covariances(
    A: Float[Array, "T D D"] | Float[Array, "T D"],
    obs_variance: Float[Array, ""],
    diagonal: bool,
    sharding: TimeSharding | None = None,
) -> Float[Array, "T D D"] | Float[Array, "T D"]:
    r"""Filtering covariances $P_1..P_T$ of the model above (unit process noise,
    observation noise `obs_variance` $= \lambda^{-1}$, exactly known $s_0$)."""
    eye = _eye_like(A, diagonal)
    kappa = 1 / (1 + obs_variance)  # Kalman gain for prior covariance I
    # Särkkä & García-Fernández (2021), eqs. (10)-(14) with H = I, Q = I, R = var I.
    A_e = (1 - kappa) * A
    C_e = (1 - kappa) * eye
    J_e = kappa * _mul(_transpose(A, diagonal), A, diagonal)
    # First element: s_0 is known, so no transition and no backward information.
    A_e = A_e.at[0].set(jnp.zeros_like(A_e[0]))
    J_e = J_e.at[0].set(jnp.zeros_like(J_e[0]))
    combine = ft.partial(_riccati_combine, diagonal=diagonal)
    _, P, _ = associative_scan(combine, (A_e, C_e, J_e), sharding=sharding)
    return P


def damped_recurrence(
    A: Float[Array, "T D D"] | Float[Array, "T D"],
    b: Float[Array, "T D"],
    x0: Float[Array, " D"],
    observations: Float[Array, "T D"],
    damping: Float[Array, ""],
    sharding: TimeSharding | None = None,
) -> Float[Array, "T D"]:
    r"""Minimiser of $\sum_k \|s_k - A_k s_{k-1} - b_k\|^2 + \lambda \sum_k
    \|s_k - o_k\|^2$ with $s_0 = x_0$: the ELK update (see module docstring).

    **Arguments:**

    - `A`, `b`: the linearised recurrence, dense `(T, D, D)` or diagonal `(T, D)`.
    - `x0`: the initial state, `(D,)`.
    - `observations`: $o_k$, the current iterate, `(T, D)`.
    - `damping`: $\lambda > 0$.
    - `sharding`: the time axis's sharding across devices (`_sharding.py`), or None.
    """
    diagonal = A.ndim == b.ndim
    T = ft.partial(_transpose, diagonal=diagonal)
    mul = ft.partial(_mul, diagonal=diagonal)
    obs_variance = 1 / damping
    eye = _eye_like(A, diagonal)
    P = filtered_covariances(A, obs_variance, diagonal, sharding)
    # Predicted covariances P^-_k = A_k P_{k-1} A_k^T + I, with P_0 = 0.
    P_prev = jnp.concatenate([jnp.zeros_like(P[:1]), P[:-1]])
    P_pred = mul(mul(A, P_prev), T(A)) + eye
    # K = P^- (P^- + var I)^{-1} = ((P^- + var I)^{-1} P^-)^T by symmetry.
    K = T(_solve(P_pred + obs_variance * eye, P_pred, diagonal))
    # Filtered means: m_k = (I - K_k)(A_k m_{k-1} + b_k) + K_k o_k.
    IK = eye - K
    transition = mul(IK, A)
    offset = matvec(IK, b) + matvec(K, observations)
    m = solve_linear_recurrence(transition, offset, x0, sharding=sharding)
    # Smoothed means, backwards: m^s_k = E_k m^s_{k+1} + (m_k - E_k (A_{k+1} m_k + b_{k+1})).
    A_next = A[1:]
    b_next = b[1:]
    # E_k = P_k A_{k+1}^T (P^-_{k+1})^{-1} = ((P^-_{k+1})^{-1} A_{k+1} P_k)^T.
    E = T(_solve(P_pred[1:], mul(A_next, P[:-1]), diagonal))
    g = m[:-1] - matvec(E, matvec(A_next, m[:-1]) + b_next)
    # Reverse recurrence m^s_k = E_k m^s_{k+1} + g_k, m^s_T = m_T: the transposed
    # recurrence with transitions A_{k+1} = E_k^T.
    E_shifted = jnp.concatenate([jnp.zeros((1,) + E.shape[1:], E.dtype), T(E)])
    offsets = jnp.concatenate([g, m[-1:]])
    return solve_linear_recurrence(E_shifted, offsets, transpose=True, sharding=sharding)
