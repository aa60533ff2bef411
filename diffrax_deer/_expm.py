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
import jax.tree_util as jtu
from jaxtyping import Array, Float

from ._batched import identity_like, matmul, matvec, take
from ._misc import batched_like, cotangents_for, is_undefined


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
    """`sum_{1 <= j} X^j / j!` (degree `degree`; e^X - I, without the identity, so that
    the small increment keeps its relative accuracy) and `sum_j X^j z / (j+1)!` (same
    degree), batched: powers `X^2, X^3` once, then Horner in `X^3` over blocks of three
    terms."""
    powers = [identity_like(X), X]
    for _ in range(2, _BLOCK + 1):
        powers.append(matmul(powers[-1], X))
    big = powers[_BLOCK]
    num_blocks = degree // _BLOCK + 1

    def block(i, coeff) -> Array:
        terms = [coeff(j) * powers[r] for r, j in _block_terms(i, degree) if j > 0]
        return ft.reduce(operator.add, terms)

    # e^X - I: coefficients 1/j!, j >= 1 (the identity is block 0's first term).
    coeff = lambda j: 1 / math.factorial(j)
    E = block(num_blocks - 1, coeff)
    for i in range(num_blocks - 2, -1, -1):
        E = block(i, coeff) + matmul(big, E)
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


def expm1_phi1(
    X: Float[Array, "*batch n n"], z: Float[Array, "*batch n"]
) -> tuple[Float[Array, "*batch n n"], Float[Array, "*batch n"]]:
    r"""Returns $(e^X - I, \varphi_1(X) z)$, batched over leading axes: `expm_phi1`
    without the identity. On a fine grid $X$ is small and $e^X$ is the identity plus a
    small increment; in float32 its rounding next to the identity is about the same from
    one grid point to the next, and adds up along a trajectory ($10^4$ steps: an error
    near $10^{-3}$ of the states). The step $y + ((e^X - I) y + \varphi_1(X) z)$ keeps
    the increment's relative accuracy. Not differentiable (the Newton iteration's
    residual; derivatives go through `expm_phi1` and `expm_action`)."""
    E1, w = _taylor_scaling_squaring(X, z)
    return E1, cast(Array, w)


def norm1(X: Array) -> Array:
    """Matrix 1-norm (largest absolute column sum) over leading batch axes; for small
    matrices written out elementwise, which XLA fuses into one pass."""
    n = X.shape[-1]
    if n > 8:
        return jnp.max(jnp.sum(jnp.abs(X), axis=-2), axis=-1)
    absolute = jnp.abs(X)
    sums = ft.reduce(operator.add, [take(absolute, i, -2) for i in range(n)])
    return ft.reduce(jnp.maximum, [take(sums, k, -1) for k in range(n)])


def _taylor_scaling_squaring(X: Array, z: Array | None):
    """Core evaluation, batched over the leading axes of `X` (..., n, n) and `z` (..., n).

    Returns `(e^X - I, phi_1(X) z)` (or `(e^X - I, None)`): without the identity, so
    that the small increment of a fine grid's step keeps its relative accuracy (a
    float32 `e^X` rounds it coherently from step to step, see `expm_action`). Work: 4
    matrix products (3 in
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
            # [[I + E, w], [0, 1]]^2 = [[I + 2E + E^2, (I + E) w + w], [0, 1]]
            w = jnp.where(square[..., None], matvec(E, w) + 2 * w, w)
        E = jnp.where(square[..., None, None], matmul(E, E) + 2 * E, E)
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
# The action e^X y + phi_1(X) z, with derivatives by Krylov vectors (see `expm_action`).
#


def _action_degree(dtype) -> int:
    # One term more than the matrix polynomial's: the action's truncation error is then
    # below the unit roundoff relative to ||X y + z|| (see `expm_action`).
    return _degree_and_theta(dtype)[0] + 1


def _needs_squaring(X: Array) -> Array:
    """Per matrix, whether `_taylor_scaling_squaring` scales and squares it."""
    return norm1(X) > _degree_and_theta(X.dtype)[1]


def _krylov(X, z, y, degree):
    """The vectors `g_i = y/(i+1)! + sum_b X^(b-1) u/(i+b+1)!` (`i = 0..degree-1`,
    `b = 1..degree-1-i`, `u = X y + z`): the top blocks of `gamma_i` in
    `expm_action`. (Unrolled: as a loop with stacked contractions it measured 2-3x
    slower on CPU.)"""
    u = matvec(X, y) + z
    powers = [u]  # X^(b-1) u
    for _ in range(degree - 2):
        powers.append(matvec(X, powers[-1]))
    f = math.factorial
    return [
        ft.reduce(
            operator.add,
            [y / f(i + 1)] + [powers[b - 1] / f(i + b + 1) for b in range(1, degree - i)],
        )
        for i in range(degree)
    ]


def _action_general(X, z, y):
    E, w = expm_phi1(X, z)
    return y + (matvec(E - identity_like(X), y) + w)


def _where_needed(needed, general, value):
    """`value` with the matrices where `needed` replaced by `general()`'s, which is
    evaluated only if one needs it: a loop of at most one trip (under `vmap` too, where
    `lax.cond` would evaluate both branches)."""

    def body(carry):
        _, value = carry
        out = general()
        select = lambda g, v: jnp.where(needed.reshape(needed.shape + (1,) * (g.ndim - needed.ndim)), g, v)
        return jnp.array(True), jtu.tree_map(select, out, value)

    start = (jnp.invert(jnp.any(needed)), value)
    return lax.while_loop(lambda carry: jnp.invert(carry[0]), body, start)[1]


def _action(X, z, y):
    # The value (its derivatives never need it: XLA drops it from them) by the
    # exponentials themselves, one trace, no branch.
    # y + (the increment): the increment keeps its relative accuracy (see
    # `expm1_phi1`).
    E1, w = _taylor_scaling_squaring(X, z)
    return y + (matvec(E1, y) + cast(Array, w))


def _general_tangent(X, z, y, tX, tz, ty):
    # (Through `expm_phi1`'s primitives: differentiable again in either mode.)
    return jax.jvp(_action_general, (X, z, y), (tX, tz, ty))[1]


def _squaring_tangent(X, z, y, tX, tz, ty):
    """`_general_tangent`'s value from one forward-mode pass through the evaluation,
    which yields the exponentials with their derivative (through `expm_phi1`, its
    custom rule evaluates them a second time). Not reverse-differentiable (its loop),
    as `_where_needed`, the only caller, is not either: the primitive's own
    derivative goes through `_general_tangent`."""
    (E1, _), (dE, dw) = jax.jvp(_taylor_scaling_squaring, (X, z), (tX, tz))
    return matvec(dE, y) + dw + ty + matvec(E1, ty)


def _small_krylov(X, z, y):
    """Which matrices need squaring, `X` with those zeroed (the Krylov path's input),
    the Taylor degree and the vectors `g_i` of `_krylov`."""
    needed = _needs_squaring(X)
    X_small = jnp.where(needed[..., None, None], 0, X)
    degree = _action_degree(X.dtype)
    return needed, X_small, degree, _krylov(X_small, z, y, degree)


def _action_tangent_impl_raw(X, z, y, tX, tz, ty):
    needed, X_small, degree, g = _small_krylov(X, z, y)
    f = math.factorial
    # sum_i X^i (tX g_i + tz/(i+1)! + ty/i!) + X^degree ty/degree!, by Horner.
    acc = ty / f(degree)
    for i in range(degree - 1, -1, -1):
        acc = matvec(X_small, acc) + matvec(tX, g[i]) + tz / f(i + 1) + ty / f(i)
    return _where_needed(needed, lambda: _squaring_tangent(X, z, y, tX, tz, ty), acc)


def _transposed_action(X, ct):
    r"""The cotangents $(\bar z, \bar y) = (\varphi_1(X^\top) \lambda, e^{X^\top}
    \lambda)$ of $e^X y + \varphi_1(X) z$ at $\lambda$ = `ct`, for any norm of `X`:
    one evaluation of the exponentials of $X^\top$, no Fréchet derivative."""
    E1, w = _taylor_scaling_squaring(jnp.swapaxes(X, -1, -2), ct)
    return cast(Array, w), ct + matvec(E1, ct)


def _squaring_transpose(X, z, y, ct):
    r"""The cotangents `(ct_X, ct_z, ct_y)` of $e^X y + \varphi_1(X) z$ at
    $\lambda$ = `ct` for any norm of `X`. The step is the top block of $e^M v$
    ($M$, $v$ as in `expm_action`), so with $\tilde\lambda = (\lambda, 0)$ the
    cotangent of $M$ is $L(M^\top)[\tilde\lambda v^\top]$ and that of $v$ is
    $e^{M^\top} \tilde\lambda$: one forward-mode pass through the evaluation of
    $e^{M^\top}$ gives both (the vector-Jacobian product through `expm_phi1` evaluates
    $e^X$ as well; measured on CPU, T = 1e4, all matrices squared: n = 8, 92-99 ms
    against 111-115 ms). Not reverse-differentiable (its loop), as `_where_needed`,
    the only caller, is not either."""
    n = X.shape[-1]
    lam = jnp.concatenate([ct, jnp.zeros_like(ct[..., :1])], axis=-1)
    v = jnp.concatenate([y, jnp.ones_like(y[..., :1])], axis=-1)
    Mt = jnp.swapaxes(_augment(X, z), -1, -2)
    direction = lam[..., :, None] * v[..., None, :]
    E1, ct_M = jax.jvp(lambda A: _taylor_scaling_squaring(A, None)[0], (Mt,), (direction,))
    ct_X, ct_z = _augmented_blocks(ct_M, n)
    return ct_X, ct_z, ct + matvec(E1, lam)[..., :n]


def _action_transpose_raw(X, z, y, ct, with_X: bool = True):
    """The cotangents `(ct_X, ct_z, ct_y)` (`ct_X` None unless `with_X`)."""
    needed, X_small, degree, g = _small_krylov(X, z, y)
    f = math.factorial
    # The transpose of the tangent above, term by term, with a_i = (X^T)^i ct.
    Xt = jnp.swapaxes(X_small, -1, -2)
    a = [ct]
    for _ in range(degree):
        a.append(matvec(Xt, a[-1]))
    ct_z = ft.reduce(operator.add, [a[i] / f(i + 1) for i in range(degree)])
    ct_y = ft.reduce(operator.add, [a[i] / f(i) for i in range(degree + 1)])
    if not with_X:
        # `X` held fixed (the implicit derivative's first-order correction): the
        # matrices that need squaring take the transposed exponentials' action, not
        # the Fréchet derivative of `expm_phi1`, which is compiled into the program
        # even where no matrix needs it (measured, CPU, py3.11, training gradients at
        # T = 1e4: 53 of the HNN's 1315 kernels and 17% of its program text, 19-20
        # of mlp4's and Van der Pol's; first-call compile 2-7% faster).
        ct_z, ct_y = _where_needed(needed, lambda: _transposed_action(X, ct), (ct_z, ct_y))
        return None, ct_z, ct_y
    outer = lambda i: a[i][..., :, None] * g[i][..., None, :]
    ct_X = ft.reduce(operator.add, [outer(i) for i in range(degree)])
    general = lambda: _squaring_transpose(X, z, y, ct)
    return _where_needed(needed, general, (ct_X, ct_z, ct_y))


@eqxi.filter_primitive_def
def _action_tangent_impl(X, z, y, tX, tz, ty):
    return [_action_tangent_impl_raw(X, z, y, tX, tz, ty)]


@eqxi.filter_primitive_def
def _action_tangent_abstract_eval(X, z, y, tX, tz, ty):
    del X, z, tX, tz, ty
    return [jax.core.ShapedArray(y.shape, y.dtype)]  # pyright: ignore[reportAttributeAccessIssue]


@eqxi.filter_primitive_jvp
def _action_tangent_jvp(primals, tangents):
    # Second order (not on the implicit derivative's path): through the general form.
    zeros = lambda t, x: jnp.zeros_like(x) if t is None else t
    tangents = tuple(map(zeros, tangents, primals))
    out = _action_tangent(*primals)
    return [out], [jax.jvp(_general_tangent, primals, tangents)[1]]


@eqxi.filter_primitive_transpose(materialise_zeros=True)  # pyright: ignore[reportCallIssue]
def _action_tangent_transpose(inputs, cts_out):
    X, z, y, tX, tz, ty = inputs
    if any(is_undefined(x) for x in (X, z, y)):
        raise NotImplementedError(
            "The derivative of the exponential's action is linear in its direction only."
        )
    (ct,) = cts_out
    grads = _action_transpose_raw(X, z, y, ct, with_X=is_undefined(tX))
    return (None, None, None, *cotangents_for((tX, tz, ty), grads))


_action_tangent_p = eqxi.create_vprim(
    "diffrax_deer_expm_action_tangent",
    _action_tangent_impl,
    _action_tangent_abstract_eval,
    _action_tangent_jvp,
    _action_tangent_transpose,
)


def _action_tangent(X, z, y, tX, tz, ty):
    tX, tz, ty = batched_like((tX, tz, ty), X)
    (out,) = eqxi.filter_primitive_bind(_action_tangent_p, X, z, y, tX, tz, ty)
    return out


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
    E1, w = _taylor_scaling_squaring(X, z)
    return E1 + identity_like(X), cast(Array, w)


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
    return _taylor_scaling_squaring(X, None)[0] + identity_like(X)


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


@jax.custom_jvp
def expm_action(
    X: Float[Array, "*batch n n"], z: Float[Array, "*batch n"], y: Float[Array, "*batch n"]
) -> Float[Array, "*batch n"]:
    r"""Returns $e^X y + \varphi_1(X) z$, batched over leading axes: the exponential
    scheme's step (its value is `expm_phi1`'s), with derivatives by matrix-vector
    products.

    The step is the top block of $e^M v$ with $M = \begin{pmatrix} X & z \\ 0 & 0
    \end{pmatrix}$ and $v = (y, 1)$. Where $\|X\|_1$ is below `expm_phi1`'s Taylor
    bound (no scaling and squaring: the usual case on a fine grid), the derivatives are
    those of the Taylor polynomial $p(M) v = \sum_{j \le m} M^j v / j!$ (degree $m$ one
    above `expm_phi1`'s, so that it agrees with $e^M v$ to the unit roundoff). With the
    Krylov vectors $\beta_b = M^b v$,

    $$\mathrm{d}\,(p(M) v) = p(M)\,\mathrm{d}v + \sum_{i < m} M^i\, \mathrm{d}M\,
    \gamma_i, \qquad \gamma_i = \sum_{b < m - i} \frac{\beta_b}{(i + b + 1)!},$$

    and the transpose of that map sends a cotangent $\lambda$ to
    $\bar M = \sum_i \alpha_i \gamma_i^\top$, $\bar v = \sum_j \alpha_j / j!$ with
    $\alpha_i = (M^\top)^i \lambda$: a sum of outer products, $O(m n^2)$ per matrix
    where the Fréchet derivative of $e^M$ takes $O(n^3)$ (reverse mode, CPU, T = 1e4,
    n = 4: 0.8 ms against 10-12 ms). Matrices that need squaring, if any, take one
    forward-mode pass through the evaluation of an exponential: of $X$ in forward
    mode; in reverse mode of $M^\top$, whose Fréchet derivative
    $L(M^\top)[\tilde\lambda v^\top]$ ($\tilde\lambda = (\lambda, 0)$) is the
    cotangent of $M$, or, with $X$ held fixed, the action of $e^{X^\top}$ and
    $\varphi_1(X^\top)$. Differentiable in forward and reverse mode; to second order
    (through `expm_phi1`'s derivatives) forward over reverse or reverse over forward,
    but not reverse over reverse (the loop that evaluates only the matrices that need
    squaring, if any, is not reverse-differentiable).

    !!! example

        ```python
        X = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
        y1 = expm_action(X, jnp.ones(2), jnp.array([1.0, 0.0]))
        ```
    """
    return _action(X, z, y)


@expm_action.defjvp
def _expm_action_jvp(primals, tangents):
    return expm_action(*primals), _action_tangent(*primals, *tangents)
