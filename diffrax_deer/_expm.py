r"""Batched matrix exponentials $e^X$ and $\varphi_1(X) z$ for the exponential scheme.

$$e^X = \sum_{j \ge 0} \frac{X^j}{j!}, \qquad
\varphi_1(X) = \sum_{j \ge 0} \frac{X^j}{(j+1)!} = (e^X - I) X^{-1}.$$

Both are read off one exponential of the augmented matrix
$\tilde X = \begin{pmatrix} X & z \\ 0 & 0 \end{pmatrix}$, since
$e^{\tilde X} = \begin{pmatrix} e^X & \varphi_1(X) z \\ 0 & 1 \end{pmatrix}$; this stays
valid when $X$ is singular. The evaluation is a truncated Taylor series of fixed low
degree $m$ (cheap when $\|X\|$ is small, which is the usual case for DEER) combined
with scaling and squaring: $X$ is divided by $2^s$ with $s$ chosen per matrix from
$\|X\|_1$ so that the truncation error is below the unit roundoff, and the result is
squared $s$ times. The loop over squarings runs only as many times as the largest $s$
in the batch, so stiff matrices ($\|X\| \gg 1$) are handled correctly and non-stiff
ones pay nothing for it.

Derivatives use the Fréchet derivative $L(X)[E]$, the directional derivative of the same
evaluation (forward mode through the polynomial and the squarings, whose number depends
on $X$ only). It is wrapped as a primitive that is linear in $E$ with transpose
$L(X^\top)[\cdot]$, so forward and reverse mode both work and reverse mode stores
nothing but $X$ (no per-squaring residuals). Its own derivative (second order) is read
off the block matrix $\begin{pmatrix} X & E \\ 0 & X \end{pmatrix}$, whose exponential
holds $L(X)[E]$ in its upper right block.
"""

import functools as ft
import math
import operator
from typing import cast

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._batched import matmul, matvec
from ._misc import batched_like, is_undefined


@ft.cache
def _degree_and_theta(dtype) -> tuple[int, float]:
    """Taylor degree `m` and the norm bound `theta` such that the truncation error
    `theta^(m+1)/(m+1)!` is below the unit roundoff of `dtype`.

    The degree is fixed (no data-dependent loop over terms: measured to cost more than
    it saves on XLA's CPU backend) and evaluated by Paterson--Stockmeyer in 4 matrix
    products (float64, degree 8) or 3 (float32, degree 5); larger norms are scaled down
    to `theta` and squared back."""
    eps = float(jnp.finfo(dtype).eps) / 2
    m = 8 if eps < 1e-10 else 5
    theta = (eps * math.factorial(m + 1)) ** (1.0 / (m + 1))
    return m, theta


_BLOCK = 3  # Paterson--Stockmeyer block size: powers X^0..X^2, Horner in X^3.


def _block_terms(i: int, degree: int) -> list[tuple[int, int]]:
    """`(r, j)` for the terms `X^j = X^r (X^3)^i` of block `i` up to `degree`."""
    return [(r, i * _BLOCK + r) for r in range(_BLOCK) if i * _BLOCK + r <= degree]


def _paterson_stockmeyer(X, z, degree):
    """`sum_j X^j / j!` (degree `degree`) and `sum_j X^j z / (j+1)!` (same degree),
    batched: powers `X^2, X^3` once, then Horner in `X^3` over blocks of three terms."""
    n = X.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(n, dtype=X.dtype), X.shape)
    powers = [eye, X]
    for _ in range(2, _BLOCK + 1):
        powers.append(matmul(powers[-1], X))
    big = powers[_BLOCK]
    num_blocks = degree // _BLOCK + 1

    def block(i, coeff) -> Array:
        terms = [coeff(j) * powers[r] for r, j in _block_terms(i, degree)]
        return ft.reduce(operator.add, terms)

    # e^X: coefficients 1/j!
    E = block(num_blocks - 1, lambda j: 1 / math.factorial(j))
    for i in range(num_blocks - 2, -1, -1):
        E = block(i, lambda j: 1 / math.factorial(j)) + matmul(big, E)
    if z is None:
        return E, None
    # phi_1(X) z: coefficients 1/(j+1)!, applied to vectors X^r z.
    vectors = [z]
    for r in range(1, _BLOCK):
        vectors.append(matvec(powers[r], z))

    def vblock(i) -> Array:
        terms = [vectors[r] / math.factorial(j + 1) for r, j in _block_terms(i, degree)]
        return ft.reduce(operator.add, terms)

    w = vblock(num_blocks - 1)
    for i in range(num_blocks - 2, -1, -1):
        w = vblock(i) + matvec(big, w)
    return E, w


def norm1(X: Array) -> Array:
    """Matrix 1-norm (largest absolute column sum) over leading batch axes; for small
    matrices written out elementwise, which XLA fuses into one pass."""
    n = X.shape[-1]
    if n > 8:
        return jnp.max(jnp.sum(jnp.abs(X), axis=-2), axis=-1)
    columns = [
        ft.reduce(operator.add, [jnp.abs(X[..., i, k]) for i in range(n)]) for k in range(n)
    ]
    return ft.reduce(jnp.maximum, columns)


def _taylor_scaling_squaring(X: Array, z: Array | None):
    """Core evaluation, batched over the leading axes of `X` (..., n, n) and `z` (..., n).

    Returns `(e^X, phi_1(X) z)` (or `(e^X, None)`). Work: 4 matrix products (3 in
    float32) for the Taylor polynomial, plus one per squaring, only as many squarings as
    the largest norm in the batch needs (none for `||X||_1 <= 0.07` in float64). Not
    differentiable through its loop: differentiate via `expm_phi1` / `expm`, which use
    the Fréchet primitive below.
    """
    degree, theta = _degree_and_theta(X.dtype)
    norm = norm1(X)
    # Number of halvings so that ||X / 2^s||_1 <= theta. Non-finite norms get s = 0 so
    # that the loop terminates; their result is non-finite anyway.
    s = jnp.ceil(jnp.log2(jnp.maximum(norm, theta) / theta))
    s = jnp.minimum(jnp.where(jnp.isfinite(s), s, 0), 1023).astype(jnp.int32)
    scale = jnp.exp2(-s.astype(X.dtype))
    Xs = X * scale[..., None, None]

    zs = None if z is None else z * scale[..., None]
    E, w = _paterson_stockmeyer(Xs, zs, degree)

    s_max = jnp.max(s) if s.ndim > 0 else s

    def square_cond(carry):
        return carry[0] < s_max

    def square_body(carry):
        i, E, w = carry
        square = i < s
        if w is not None:
            # [[E, w], [0, 1]]^2 = [[E^2, E w + w], [0, 1]]
            w = jnp.where(square[..., None], matvec(E, w) + w, w)
        E = jnp.where(square[..., None, None], matmul(E, E), E)
        return i + 1, E, w

    _, E, w = lax.while_loop(square_cond, square_body, (jnp.array(0, jnp.int32), E, w))
    return E, w


#
# Fréchet derivative as a primitive linear in its second argument.
#


def _block(X, E):
    zero = jnp.zeros_like(X)
    top = jnp.concatenate([X, E], axis=-1)
    bottom = jnp.concatenate([zero, X], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)


def _frechet_impl_raw(X, E):
    # Forward-mode differentiation of the evaluation itself, with the number of
    # squarings fixed by X alone (it is piecewise constant in X, and its tangent is
    # zero): linear in E, exact to round-off, and about a quarter of the cost of
    # reading the derivative off the exponential of the 2n x 2n block matrix
    # [[X, E], [0, X]] (measured on CPU: T = 1e4, n = 5, 8.4 ms against 36 ms; n = 17,
    # 133 ms against 577 ms), which also needs more squarings when E is large.
    return jax.jvp(lambda X: _taylor_scaling_squaring(X, None)[0], (X,), (E,))[1]


@eqxi.filter_primitive_def
def _frechet_impl(X, E):
    return [_frechet_impl_raw(X, E)]


@eqxi.filter_primitive_def
def _frechet_abstract_eval(X, E):
    return [jax.core.ShapedArray(E.shape, E.dtype)]  # pyright: ignore[reportAttributeAccessIssue]


def _frechet(X: Array, E: Array) -> Array:
    (out,) = eqxi.filter_primitive_bind(_frechet_p, X, batched_like(E, X))
    return out


@eqxi.filter_primitive_jvp
def _frechet_jvp(primals, tangents):
    X, E = primals
    tX, tE = tangents
    out = _frechet(X, E)
    n = X.shape[-1]
    # d/d(X, E) of [exp([[X, E], [0, X]])]_{12} is the Fréchet derivative of the block
    # matrix in the direction [[tX, tE], [0, tX]], read off the same block.
    tX = jnp.zeros_like(X) if tX is None else tX
    tE = jnp.zeros_like(E) if tE is None else tE
    t_out = _frechet(_block(X, E), _block(tX, tE))[..., :n, n:]
    return [out], [t_out]


@eqxi.filter_primitive_transpose(materialise_zeros=True)  # pyright: ignore[reportCallIssue]
def _frechet_transpose(inputs, cts_out):
    X, E = inputs
    if is_undefined(X):
        raise NotImplementedError(
            "The Fréchet derivative of the matrix exponential is linear in its "
            "direction only."
        )
    (ct,) = cts_out
    # <W, L(X)[E]> = <L(X^T)[W], E>
    return None, _frechet(jnp.swapaxes(X, -1, -2), ct)


_frechet_p = eqxi.create_vprim(
    "diffrax_deer_expm_frechet",
    _frechet_impl,
    _frechet_abstract_eval,
    _frechet_jvp,
    _frechet_transpose,
)


#
# The Fréchet derivative of (e^X, phi_1(X) z) in (X, z), a primitive linear in the
# direction (tX, tz): forward mode through the evaluation of the n x n matrices and the
# vector themselves, not of the (n + 1) x (n + 1) augmented matrix (a quarter of the
# cost: T = 1e4, n = 4, 2.9 ms against 11 ms on CPU). Its transpose and its own
# derivative go through the augmented matrix's.
#


def _frechet_phi1_impl_raw(X, z, tX, tz):
    return jax.jvp(lambda X, z: _taylor_scaling_squaring(X, z), (X, z), (tX, tz))[1]


@eqxi.filter_primitive_def
def _frechet_phi1_impl(X, z, tX, tz):
    return list(_frechet_phi1_impl_raw(X, z, tX, tz))


@eqxi.filter_primitive_def
def _frechet_phi1_abstract_eval(X, z, tX, tz):
    del X, z
    shaped = jax.core.ShapedArray  # pyright: ignore[reportAttributeAccessIssue]
    return [shaped(tX.shape, tX.dtype), shaped(tz.shape, tz.dtype)]


def _frechet_phi1(X: Array, z: Array, tX: Array, tz: Array) -> tuple[Array, Array]:
    tX, tz = batched_like((tX, tz), X)
    L_E, L_w = eqxi.filter_primitive_bind(_frechet_phi1_p, X, z, tX, tz)
    return L_E, L_w


def _augmented_blocks(L: Array, n: int) -> tuple[Array, Array]:
    return L[..., :n, :n], L[..., :n, n]


@eqxi.filter_primitive_jvp
def _frechet_phi1_jvp(primals, tangents):
    X, z, tX, tz = primals
    n = X.shape[-1]
    out = list(_frechet_phi1(X, z, tX, tz))
    zeros = lambda t, x: jnp.zeros_like(x) if t is None else t
    dX, dz, dtX, dtz = map(zeros, tangents, primals)
    # As `_frechet_jvp`, for the augmented matrices.
    m = n + 1
    block = _frechet(
        _block(_augment(X, z), _augment(tX, tz)), _block(_augment(dX, dz), _augment(dtX, dtz))
    )
    return out, list(_augmented_blocks(block[..., :m, m:], n))


@eqxi.filter_primitive_transpose(materialise_zeros=True)  # pyright: ignore[reportCallIssue]
def _frechet_phi1_transpose(inputs, cts_out):
    X, z, tX, tz = inputs
    if is_undefined(X) or is_undefined(z):
        raise NotImplementedError(
            "The Fréchet derivative of the matrix exponential is linear in its "
            "direction only."
        )
    G, g = cts_out
    n = X.shape[-1]
    # The transpose of (tX, tz) -> blocks of L(M)[aug(tX, tz)], M = aug(X, z).
    L = _frechet(jnp.swapaxes(_augment(X, z), -1, -2), _augment(G, g))
    ct_X, ct_z = _augmented_blocks(L, n)
    return None, None, ct_X, ct_z


_frechet_phi1_p = eqxi.create_vprim(
    "diffrax_deer_expm_phi1_frechet",
    _frechet_phi1_impl,
    _frechet_phi1_abstract_eval,
    _frechet_phi1_jvp,
    _frechet_phi1_transpose,
)


#
# Public(ish) functions.
#


def _augment(X, z):
    n = X.shape[-1]
    batch = X.shape[:-2]
    top = jnp.concatenate([X, z[..., None]], axis=-1)
    bottom = jnp.zeros(batch + (1, n + 1), X.dtype)
    return jnp.concatenate([top, bottom], axis=-2)


@jax.custom_jvp
def expm_phi1(
    X: Float[Array, "*batch n n"], z: Float[Array, "*batch n"]
) -> tuple[Float[Array, "*batch n n"], Float[Array, "*batch n"]]:
    r"""Returns $(e^X, \varphi_1(X) z)$, batched over leading axes.

    Accurate for any $\|X\|$ (scaling and squaring), cheap when $\|X\|$ is small;
    differentiable in forward and reverse mode (to any order).

    !!! example

        ```python
        X = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
        E, w = expm_phi1(X, jnp.ones(2))
        ```
    """
    E, w = _taylor_scaling_squaring(X, z)
    return E, cast(Array, w)


@expm_phi1.defjvp
def _expm_phi1_jvp(primals, tangents):
    X, z = primals
    tX, tz = tangents
    return expm_phi1(X, z), _frechet_phi1(X, z, tX, tz)


@jax.custom_jvp
def expm(X: Float[Array, "*batch n n"]) -> Float[Array, "*batch n n"]:
    r"""Matrix exponential $e^X$, batched over leading axes; see
    [`diffrax_deer.expm_phi1`][]. Agrees with `jax.scipy.linalg.expm`, but costs a
    fixed low-degree polynomial plus only as many squarings as the batch needs."""
    return _taylor_scaling_squaring(X, None)[0]


@expm.defjvp
def _expm_jvp(primals, tangents):
    (X,) = primals
    (tX,) = tangents
    return expm(X), _frechet(X, tX)


def exp_phi1_diagonal(
    x: Float[Array, "*batch n"], z: Float[Array, "*batch n"]
) -> tuple[Float[Array, "*batch n"], Float[Array, "*batch n"]]:
    r"""Elementwise $(e^x, \varphi_1(x) z)$ for diagonal $X = \operatorname{diag}(x)$,
    with $\varphi_1(x) = (e^x - 1)/x$ evaluated stably near $x = 0$."""
    small = jnp.abs(x) < 1e-4
    safe_x = jnp.where(small, 1.0, x)
    phi = jnp.where(small, 1 + x / 2 + x**2 / 6, jnp.expm1(safe_x) / safe_x)
    return jnp.exp(x), phi * z
