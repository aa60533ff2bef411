"""Batched small-matrix products, `(..., D, D)` by `(..., D, D)` or `(..., D)`.

XLA's batched `dot_general` on CPU is slow for many tiny matrices (measured on this
project's 2-core CPU at T = 1e5: D = 4 takes 19 ms with `einsum`, 0.7 ms as a sum of
D outer products that XLA fuses into one elementwise loop). We use the fused form
wherever it is faster: small `D` on every backend, and any `D` on CPU. Elementwise
products are also exact in float32, with no TF32 rounding on GPUs.
"""

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array


_HIGHEST = lax.Precision.HIGHEST
_FUSED_MAX_D = 8


def _use_fused(D: int) -> bool:
    return D <= _FUSED_MAX_D or jax.default_backend() == "cpu"


def identity_like(A: Array) -> Array:
    """The identity, broadcast to `A`'s batch of square `(..., D, D)` matrices."""
    return jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)


def take(A: Array, i: int, axis: int, keepdims: bool = False) -> Array:
    """`A`'s index `i` along `axis` (negative: from the end). With `lax`'s slicing, not
    NumPy indexing: the unrolled products here take hundreds of slices, and NumPy-style
    indexing costs about half a millisecond of tracing each (measured: a third of a
    second of the HNN gradient's first call on CPU, py3.11)."""
    return lax.index_in_dim(A, i, axis % A.ndim, keepdims=keepdims)


def matmul(A: Array, B: Array) -> Array:
    """`A @ B` over leading batch axes, for square `(..., D, D)` matrices."""
    D = A.shape[-1]
    if _use_fused(D):
        out = take(A, 0, -1, keepdims=True) * take(B, 0, -2, keepdims=True)
        for j in range(1, D):
            out = out + take(A, j, -1, keepdims=True) * take(B, j, -2, keepdims=True)
        return out
    return jnp.einsum("...ij,...jk->...ik", A, B, precision=_HIGHEST)


def matvec(A: Array, x: Array) -> Array:
    """`A @ x` over leading batch axes, for dense `(..., D, D)` or diagonal `(..., D)`
    `A`."""
    if A.ndim == x.ndim:
        return A * x
    return jnp.einsum("...ij,...j->...i", A, x, precision=_HIGHEST)


def solve(M: Array, B: Array) -> Array:
    """`M^{-1} B` over leading batch axes, for square `(..., n, n)` `M` and `(..., n, m)`
    `B`: Gauss--Jordan elimination with partial pivoting written in plain array
    operations. For the small matrices used here this is fused by XLA, and it avoids
    LAPACK custom calls inside scans (which hung XLA's CPU runtime in jax 0.10)."""
    n = M.shape[-1]
    aug = jnp.concatenate([M, B], axis=-1)
    rows = jnp.broadcast_to(jnp.arange(n), aug.shape[:-1])  # (..., n)

    def eliminate(k, aug):
        column = jnp.abs(jnp.take(aug, k, axis=-1))  # (..., n)
        column = jnp.where(rows >= k, column, -1.0)
        p = jnp.argmax(column, axis=-1)[..., None]  # pivot row, (..., 1)
        perm = jnp.where(rows == k, p, jnp.where(rows == p, k, rows))
        aug = jnp.take_along_axis(aug, perm[..., None], axis=-2)
        pivot_row = jnp.take(aug, k, axis=-2)  # (..., n + m)
        pivot_row = pivot_row / jnp.take(pivot_row, k, axis=-1)[..., None]
        factors = jnp.take(aug, k, axis=-1)  # (..., n)
        aug = aug - factors[..., :, None] * pivot_row[..., None, :]
        return jnp.where((rows == k)[..., None], pivot_row[..., None, :], aug)

    aug = lax.fori_loop(0, n, eliminate, aug)
    return aug[..., n:]
