import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffrax_deer._kalman import damped_recurrence
from diffrax_deer import linear_recurrence


def _dense_minimiser(A, b, x0, obs, lam):
    """Solve the normal equations (L^T L + lam I) s = L^T c + lam o densely."""
    T, D = b.shape
    Ad = np.asarray(A if A.ndim == 3 else jax.vmap(jnp.diag)(A))
    L = np.eye(T * D)
    for k in range(1, T):
        L[k * D : (k + 1) * D, (k - 1) * D : k * D] = -Ad[k]
    c = np.asarray(b).copy()
    c[0] += Ad[0] @ np.asarray(x0)
    lhs = L.T @ L + lam * np.eye(T * D)
    rhs = L.T @ c.reshape(-1) + lam * np.asarray(obs).reshape(-1)
    return np.linalg.solve(lhs, rhs).reshape(T, D)


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
@pytest.mark.parametrize("lam", [1e-3, 1.0, 1e3])
def test_matches_dense_levenberg_marquardt(structure, lam):
    T, D = 23, 3
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    if structure == "dense":
        A = 1.1 * jax.random.normal(k1, (T, D, D)) / jnp.sqrt(D)
    else:
        A = jax.random.uniform(k1, (T, D), minval=-1.5, maxval=1.5)
    b = jax.random.normal(k2, (T, D))
    x0 = jax.random.normal(k3, (D,))
    obs = jax.random.normal(k4, (T, D))
    got = damped_recurrence(A, b, x0, obs, jnp.asarray(lam))
    expected = _dense_minimiser(A, b, x0, obs, lam)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)


def test_small_damping_is_the_newton_step():
    T, D = 50, 2
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    A = 0.5 * jax.random.normal(k1, (T, D, D))
    b = jax.random.normal(k2, (T, D))
    x0 = jax.random.normal(k3, (D,))
    got = damped_recurrence(A, b, x0, jnp.zeros((T, D)), jnp.asarray(1e-12))
    np.testing.assert_allclose(got, linear_recurrence(A, b, x0), atol=1e-8)
