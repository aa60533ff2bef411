import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffrax_deer import linear_recurrence, sequential_linear_recurrence


def _random(structure, T=37, D=3, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    if structure == "dense":
        A = 0.5 * jax.random.normal(k1, (T, D, D)) / jnp.sqrt(D)
    else:
        A = jax.random.uniform(k1, (T, D), minval=-1.2, maxval=1.2)
    b = jax.random.normal(k2, (T, D))
    x0 = jax.random.normal(k3, (D,))
    return A, b, x0


def _dense_operator(A):
    """The (T D) x (T D) matrix L with (L x)_k = x_k - A_k x_{k-1}."""
    T, D = A.shape[0], A.shape[-1]
    if A.ndim == 2:
        A = jax.vmap(jnp.diag)(A)
    L = np.eye(T * D)
    for k in range(1, T):
        L[k * D : (k + 1) * D, (k - 1) * D : k * D] = -np.asarray(A[k])
    return L


METHODS = ["associative", "chunked", "sequential"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_forward_matches_sequential_and_dense_solve(structure, method):
    A, b, x0 = _random(structure)
    x = linear_recurrence(A, b, x0, method=method)
    x_seq = sequential_linear_recurrence(A, b, x0)
    np.testing.assert_allclose(x, x_seq, rtol=1e-12, atol=1e-12)
    # Explicit loop.
    Ad = A if structure == "dense" else jax.vmap(jnp.diag)(A)
    state = x0
    for k in range(A.shape[0]):
        state = Ad[k] @ state + b[k]
        np.testing.assert_allclose(x[k], state, rtol=1e-12, atol=1e-12)
    # Without x0 it solves L x = b.
    L = _dense_operator(A)
    x_no_init = linear_recurrence(A, b, method=method)
    np.testing.assert_allclose(
        x_no_init.reshape(-1), np.linalg.solve(L, np.asarray(b).reshape(-1)), atol=1e-11
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_transpose_solves_transposed_system(structure, method):
    A, b, _ = _random(structure, seed=1)
    lam = linear_recurrence(A, b, transpose=True, method=method)
    L = _dense_operator(A)
    expected = np.linalg.solve(L.T, np.asarray(b).reshape(-1))
    np.testing.assert_allclose(lam.reshape(-1), expected, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(
        sequential_linear_recurrence(A, b, transpose=True), lam, rtol=1e-11, atol=1e-11
    )


def test_transpose_is_adjoint_of_forward():
    # <L^{-1} b, g> = <b, L^{-T} g> exactly what reverse-mode differentiation relies on.
    A, b, _ = _random("dense", T=17, D=4, seed=2)
    g = jax.random.normal(jax.random.PRNGKey(3), b.shape)
    forward = jax.jit(linear_recurrence)
    backward = jax.jit(lambda A, b: linear_recurrence(A, b, transpose=True))
    lhs = jnp.sum(forward(A, b) * g)
    rhs = jnp.sum(b * backward(A, g))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
    # and autodiff of the forward scan agrees with the transposed scan
    grad_b = jax.jit(
        jax.grad(lambda b: jnp.sum(linear_recurrence(A, b, method="associative") * g))
    )(b)
    np.testing.assert_allclose(grad_b, backward(A, g), atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 1_007])
def test_lengths_and_jit(T):
    # Lengths that are not a multiple of any chunk size, including a single step.
    # (Everything under jit: op-by-op dispatch of a 1007-step scan is slow.)
    A, b, x0 = _random("dense", T=T, D=2, seed=4)
    expected = jax.jit(sequential_linear_recurrence)(A, b, x0)
    expected_transpose = jax.jit(
        lambda A, b: sequential_linear_recurrence(A, b, transpose=True)
    )(A, b)
    for method in ["associative", "chunked"]:
        x = jax.jit(lambda A, b, x0: linear_recurrence(A, b, x0, method=method))(A, b, x0)
        np.testing.assert_allclose(x, expected, atol=1e-10)
        lam = jax.jit(lambda A, b: linear_recurrence(A, b, transpose=True, method=method))(A, b)
        np.testing.assert_allclose(lam, expected_transpose, atol=1e-10)


def test_shape_errors():
    with pytest.raises(ValueError, match="Dense transition"):
        linear_recurrence(jnp.zeros((5, 2, 3)), jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="Diagonal transitions"):
        linear_recurrence(jnp.zeros((5, 3)), jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="method"):
        linear_recurrence(jnp.zeros((5, 2)), jnp.zeros((5, 2)), method="magic")
    with pytest.raises(ValueError, match="x0"):
        linear_recurrence(jnp.zeros((5, 2)), jnp.zeros((5, 2)), jnp.zeros(2), transpose=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("T", [1, 2, 3, 50, 101])
def test_generic_associative_scan(method, T):
    # A non-commutative operator (matrix products) over a PyTree of elements.
    from diffrax_deer._linear_recurrence import associative_scan

    M = jnp.eye(3)[None] + 0.3 * jax.random.normal(jax.random.PRNGKey(5), (T, 3, 3))
    v = jax.random.normal(jax.random.PRNGKey(6), (T, 3))

    def op(a, b):  # batched over leading axes, as associative scans require
        return (
            jnp.einsum("...ij,...jk->...ik", b[0], a[0]),
            jnp.einsum("...ij,...j->...i", b[0], a[1]) + b[1],
        )

    expected = jax.lax.associative_scan(op, (M, v))
    got = associative_scan(op, (M, v), method=method)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)


def test_batched_solve_with_pivoting():
    from diffrax_deer._batched import solve

    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    M = jax.random.normal(k1, (40, 5, 5))
    M = M.at[:, 0, 0].set(0.0)  # a zero leading entry needs a row swap
    B = jax.random.normal(k2, (40, 5, 2))
    np.testing.assert_allclose(solve(M, B), jnp.linalg.solve(M, B), rtol=1e-9, atol=1e-9)
