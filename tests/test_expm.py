import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest
from diffrax_deer import exp_phi1_diagonal, expm, expm_action, expm_phi1


@pytest.mark.parametrize("scale", [1e-8, 1e-3, 0.1, 1.0, 5.0, 30.0])
def test_expm_matches_scipy_random(scale):
    X = jax.random.normal(jax.random.PRNGKey(0), (20, 4, 4)) * scale / 2
    E = expm(X)
    E_ref = jax.vmap(jsl.expm)(X)
    rel = jnp.max(jnp.abs(E - E_ref)) / jnp.max(jnp.abs(E_ref))
    assert rel < 1e-10


@pytest.mark.parametrize("stiffness", [1.0, 1e2, 1e4, 1e6])
def test_expm_stiff_negative_definite(stiffness):
    # Stiff, negative-definite generators (large ||J dt||): the regime a truncated
    # Taylor series without scaling and squaring gets badly wrong.
    key = jax.random.PRNGKey(1)
    Q, _ = jnp.linalg.qr(jax.random.normal(key, (3, 3)))
    lam = -jnp.array([stiffness, 1.0, 0.1])
    X = Q @ jnp.diag(lam) @ Q.T
    E = expm(X[None])[0]
    E_ref = Q @ jnp.diag(jnp.exp(lam)) @ Q.T
    np.testing.assert_allclose(E, E_ref, atol=1e-9)


def test_phi1_closed_form_including_singular():
    lam = jnp.array([-1e4, -3.0, -1e-9, 0.0, 0.5, 2.0])
    X = jnp.diag(lam)[None]
    z = jnp.ones((1, 6))
    E, w = expm_phi1(X, z)
    expected = jnp.where(lam == 0, 1.0, jnp.expm1(lam) / jnp.where(lam == 0, 1.0, lam))
    np.testing.assert_allclose(w[0], expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jnp.diag(E[0]), jnp.exp(lam), rtol=1e-10, atol=1e-300)
    # A nilpotent (singular, non-diagonalisable) generator: phi1 = I + X/2.
    N = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    E, w = expm_phi1(N[None], jnp.array([[1.0, 2.0]]))
    np.testing.assert_allclose(E[0], jnp.eye(2) + N, atol=1e-15)
    np.testing.assert_allclose(w[0], jnp.array([2.0, 2.0]), atol=1e-15)


def test_phi1_matches_augmented_scipy():
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    X = jax.random.normal(k1, (10, 3, 3)) * 3
    z = jax.random.normal(k2, (10, 3))
    _, w = expm_phi1(X, z)
    aug = jnp.zeros((10, 4, 4)).at[:, :3, :3].set(X).at[:, :3, 3].set(z)
    w_ref = jax.vmap(jsl.expm)(aug)[:, :3, 3]
    np.testing.assert_allclose(w, w_ref, rtol=1e-11, atol=1e-11)


def test_derivatives_forward_reverse_second_order():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    X = jax.random.normal(k1, (3, 3, 3)) * 2
    z = jax.random.normal(k2, (3, 3))
    tX = jax.random.normal(k3, X.shape)
    tz = jax.random.normal(k4, z.shape)

    def loss(X, z):
        E, w = expm_phi1(X, z)
        return jnp.sum(jnp.sin(E)) + jnp.sum(w**2)

    eps = 1e-6
    fd = (loss(X + eps * tX, z + eps * tz) - loss(X - eps * tX, z - eps * tz)) / (2 * eps)
    _, fwd = jax.jvp(loss, (X, z), (tX, tz))
    gX, gz = jax.grad(loss, (0, 1))(X, z)
    rev = jnp.sum(gX * tX) + jnp.sum(gz * tz)
    np.testing.assert_allclose(fwd, fd, rtol=1e-7)
    np.testing.assert_allclose(rev, fd, rtol=1e-7)
    # second order: forward-over-reverse against finite differences of the gradient
    hvp = jax.jvp(lambda X: jax.grad(loss)(X, z), (X,), (tX,))[1]
    hfd = (jax.grad(loss)(X + eps * tX, z) - jax.grad(loss)(X - eps * tX, z)) / (2 * eps)
    np.testing.assert_allclose(hvp, hfd, rtol=1e-5, atol=1e-5 * jnp.max(jnp.abs(hfd)))
    # second order, forward-over-forward (the jvp rule's own jvp): the second directional
    # derivative against central differences of the first
    d1 = lambda X, z: jax.jvp(loss, (X, z), (tX, tz))[1]
    d2 = jax.jvp(d1, (X, z), (tX, tz))[1]
    d2_fd = (d1(X + eps * tX, z + eps * tz) - d1(X - eps * tX, z - eps * tz)) / (2 * eps)
    np.testing.assert_allclose(d2, d2_fd, rtol=1e-6)
    # gradient of expm agrees with scipy's
    g = jax.grad(lambda X: jnp.sum(expm(X) * tX))(X)
    g_ref = jax.grad(lambda X: jnp.sum(jax.vmap(jsl.expm)(X) * tX))(X)
    np.testing.assert_allclose(g, g_ref, rtol=1e-9)


def test_diagonal():
    x = jnp.array([-50.0, -1.0, -1e-7, 0.0, 1e-6, 0.3, 4.0])
    z = jnp.arange(1.0, 8.0)
    a, w = exp_phi1_diagonal(x, z)
    E, w_dense = expm_phi1(jnp.diag(x)[None], z[None])
    np.testing.assert_allclose(a, jnp.exp(x))
    np.testing.assert_allclose(w, w_dense[0], rtol=1e-12)
    g = jax.grad(lambda x: jnp.sum(exp_phi1_diagonal(x, z)[1]))(x)
    assert jnp.all(jnp.isfinite(g))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_action_matches_exponentials_and_derivatives(dtype):
    # A batch mixing small matrices (Taylor polynomial, Krylov derivatives) with ones
    # that need scaling and squaring (through expm_phi1), and one of small matrices
    # only: value, forward and reverse mode (also under vmap) against
    # e^X y + phi_1(X) z from expm_phi1; in float64 also against central differences,
    # and second order.
    keys = jax.random.split(jax.random.PRNGKey(5), 7)
    scales = jnp.array([0.001, 0.02, 0.5, 3.0])[:, None, None]
    X = (jax.random.normal(keys[0], (4, 4, 4)) * scales).astype(dtype)
    z, y, tz, ty, ct = (jax.random.normal(k, (4, 4)).astype(dtype) for k in keys[1:6])
    tX = jax.random.normal(keys[6], X.shape).astype(dtype)

    def reference(X, z, y):
        E, w = expm_phi1(X, z)
        return jnp.einsum("...ij,...j->...i", E, y) + w

    @jax.jit
    def derivatives(X, z, y, tX, tz, ty, ct):
        out = {}
        for name, fn in (("ours", expm_action), ("ref", reference)):
            value, tangent = jax.jvp(fn, (X, z, y), (tX, tz, ty))
            pullback = lambda *p, fn=fn: jax.vjp(fn, *p[:3])[1](p[3])
            cts = jax.vmap(pullback)(X, z, y, ct) if name == "ours" else pullback(X, z, y, ct)
            out[name] = (value, tangent, *cts)
        return out

    rtol = 1e-12 if dtype == jnp.float64 else 1e-5
    for batch in (slice(None), slice(0, 2)):  # mixed; small matrices only
        out = derivatives(*(x[batch] for x in (X, z, y, tX, tz, ty, ct)))
        for a, b in zip(out["ours"], out["ref"], strict=True):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * jnp.max(jnp.abs(b)))
    if dtype == jnp.float64:
        loss = lambda X: jnp.sum(jnp.sin(expm_action(X, z, y)))
        grad = jax.grad(loss)
        eps = 1e-6

        @jax.jit
        def second_order(X, tX):
            fd = (loss(X + eps * tX) - loss(X - eps * tX)) / (2 * eps)
            hfd = (grad(X + eps * tX) - grad(X - eps * tX)) / (2 * eps)
            return jnp.sum(grad(X) * tX), fd, jax.jvp(grad, (X,), (tX,))[1], hfd

        directional, fd, hvp, hfd = second_order(X, tX)
        np.testing.assert_allclose(directional, fd, rtol=1e-7)
        np.testing.assert_allclose(hvp, hfd, rtol=1e-5, atol=1e-5 * jnp.max(jnp.abs(hfd)))


def test_action_with_matrix_held_fixed():
    # Derivatives in (z, y) only, X a constant (as in the implicit derivative's
    # first-order correction), on a batch mixing small matrices with ones that need
    # squaring, forward and reverse (also under vmap), against e^X y + phi_1(X) z from
    # expm_phi1.
    keys = jax.random.split(jax.random.PRNGKey(7), 6)
    scales = jnp.array([0.001, 0.02, 0.5, 3.0])[:, None, None]
    X = jax.random.normal(keys[0], (4, 4, 4)) * scales
    z, y, tz, ty, ct = (jax.random.normal(k, (4, 4)) for k in keys[1:6])

    def reference(z, y):
        E, w = expm_phi1(X, z)
        return jnp.einsum("...ij,...j->...i", E, y) + w

    @jax.jit
    def derivatives(z, y, tz, ty, ct):
        out = {}
        for name, fn in (("ours", lambda z, y: expm_action(X, z, y)), ("ref", reference)):
            value, tangent = jax.jvp(fn, (z, y), (tz, ty))
            out[name] = (value, tangent, *jax.vjp(fn, z, y)[1](ct))
        one = lambda X, z, y, c: jax.vjp(lambda z, y: expm_action(X, z, y), z, y)[1](c)
        out["vmap"] = jax.vmap(one)(X, z, y, ct)
        return out

    out = derivatives(z, y, tz, ty, ct)
    for a, b in zip(out["ours"] + out["vmap"], out["ref"] + out["ref"][2:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * jnp.max(jnp.abs(b)))
