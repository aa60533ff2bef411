r"""Linear recurrences $x_k = A_k x_{k-1} + b_k$, solved in parallel over their length.

This is the parallel core that every method in this package reduces to: each Newton
iteration (DEER, quasi-DEER, ...) and each implicit-differentiation solve is one call
to [`diffrax_deer.linear_recurrence`][].
"""

import math
from typing import Literal

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh
from jaxtyping import Array, Float

from ._batched import matmul, matvec
from ._sharding import time_sharding, TimeSharding


Method = Literal["auto", "associative", "chunked", "sequential"]


def _is_diagonal(A: Array, b: Array) -> bool:
    if b.ndim != 2:
        raise ValueError(f"Offsets must have shape (T, D); got {b.shape}.")
    if A.ndim == b.ndim + 1:
        if A.shape[-1] != A.shape[-2] or A.shape[:-1] != b.shape:
            raise ValueError(
                f"Dense transition matrices must have shape (T, D, D) for offsets of "
                f"shape (T, D); got A{A.shape} and b{b.shape}."
            )
        return False
    if A.shape != b.shape:
        raise ValueError(
            f"Diagonal transitions must have the same shape (T, D) as the offsets; got "
            f"A{A.shape} and b{b.shape}."
        )
    return True


def _compose(A_j, A_i):
    """Transition of two steps, `A_j A_i`, dense or diagonal."""
    return A_j * A_i if A_j.ndim == A_i.ndim and A_i.ndim == 2 else matmul(A_j, A_i)


def _identity(D: int, diagonal: bool, dtype, batch: tuple[int, ...] = ()) -> Array:
    if diagonal:
        return jnp.ones(batch + (D,), dtype)
    return jnp.broadcast_to(jnp.eye(D, dtype=dtype), batch + (D, D))


def _pad_identity(A, b, length: int):
    """`A`, `b` padded at the end to `length` with identity maps (`A = I`, `b = 0`):
    the states there repeat the last one, and the aggregate map is unchanged."""
    pad = length - b.shape[0]
    if pad == 0:
        return A, b
    D = b.shape[1]
    A = jnp.concatenate([A, _identity(D, A.ndim == b.ndim, A.dtype, (pad,))])
    b = jnp.concatenate([b, jnp.zeros((pad, D), b.dtype)])
    return A, b


def _combine(earlier, later):
    A_i, b_i = earlier
    A_j, b_j = later
    if A_i.ndim == b_i.ndim:  # diagonal
        return A_j * A_i, A_j * b_i + b_j
    return matmul(A_j, A_i), matvec(A_j, b_i) + b_j


def _associative(A, b):
    _, out = lax.associative_scan(_combine, (A, b))
    return out


def _sequential(A, b):
    def step(x, inp):
        a, bk = inp
        x = matvec(a, x) + bk
        return x, x

    _, out = lax.scan(step, jnp.zeros_like(b[0]), (A, b))
    return out


def _chunked_pieces(A, b):
    """The chunked solve in pieces (see `_chunked`): the aggregate affine map of the
    whole recurrence (a function, computed only if asked for) and `finish(x)`, the
    states from the initial state `x`."""
    T, D = b.shape
    L = max(1, math.isqrt(T - 1) + 1)
    C = -(-T // L)
    diagonal = A.ndim == b.ndim
    # Padded with identity maps, which leave the aggregate unchanged.
    A, b = _pad_identity(A, b, C * L)
    # (L, C, ...): scan over the position within the chunk, vectorised over chunks.
    A = jnp.swapaxes(A.reshape((C, L) + A.shape[1:]), 0, 1)
    b = jnp.swapaxes(b.reshape(C, L, D), 0, 1)
    identity = _identity(D, diagonal, A.dtype, (C,))

    def summarise(carry, inp):
        P, x = carry
        a, bk = inp
        return (_compose(a, P), matvec(a, x) + bk), None

    (P, x_end), _ = lax.scan(summarise, (identity, jnp.zeros((C, D), b.dtype)), (A, b))

    def aggregate():
        def body(carry, inp):
            return _combine(carry, inp), None

        total, _ = lax.scan(body, (identity[0], jnp.zeros(D, b.dtype)), (P, x_end))
        return total

    def finish(x0):
        def chunk_start(x, inp):
            P_c, x_c = inp
            return matvec(P_c, x) + x_c, x

        _, starts = lax.scan(chunk_start, x0, (P, x_end))

        def rerun(x, inp):
            a, bk = inp
            x = matvec(a, x) + bk
            return x, x

        _, out = lax.scan(rerun, starts, (A, b))
        return jnp.swapaxes(out, 0, 1).reshape(C * L, D)[:T]

    return aggregate, finish


def _chunked(A, b):
    """Three passes over `C` chunks of length `L ~ sqrt(T)`, each vectorised over the
    chunks: (1) each chunk's total transition and its end state from zero, (2) the
    chunks' initial states, a short recurrence over the `C` chunks, (3) each chunk
    rerun from its initial state. `O(T)` work, no `(T, D, D)` temporaries, and a
    program whose size does not grow with `T` (fast to compile)."""
    _, finish = _chunked_pieces(A, b)
    return finish(jnp.zeros_like(b[0]))


def _prefix_pieces(A, b, method):
    """The associative (or sequential) solve in pieces: every prefix's affine map,
    from which the aggregate is the last and `finish(x)` one product per state."""
    A_cum, x = associative_scan(_combine, (A, b), method)
    return (lambda: (A_cum[-1], x[-1])), (
        lambda x0: x + matvec(A_cum, jnp.broadcast_to(x0, x.shape))
    )


def associative_scan(
    fn, elems, method: Method = "auto", sharding: TimeSharding | None = None
):
    """Inclusive scan of an associative operator `fn(earlier, later)` over the leading
    axis of the PyTree `elems`, like `jax.lax.associative_scan`.

    `method="chunked"` (the default on CPU) sweeps `sqrt(T)` chunks: local prefixes by a
    `jax.lax.scan` vectorised over the chunks, a short scan over the chunk totals, and
    one vectorised combine. `fn` then appears three times in the program instead of
    `O(log T)` times (much faster to compile), with `O(T)` applications of `fn`.

    With `sharding` (see `_sharding.py`), each device scans its slice, the slices'
    totals are exchanged once, and each device combines its slice with the total of
    the slices before it. (The padding of an uneven length is combined only into
    discarded outputs.)
    """
    if sharding is not None:
        return _sharded_associative_scan(fn, elems, method, sharding)
    if method == "auto":
        method = _default_method()
    if method == "associative":
        return lax.associative_scan(fn, elems)
    leaves = jax.tree_util.tree_leaves(elems)
    T = leaves[0].shape[0]
    if method == "sequential" or T <= 2:
        def step(carry, x):
            out = fn(carry, x)
            return out, out

        first = jax.tree_util.tree_map(lambda x: x[0], elems)
        rest = jax.tree_util.tree_map(lambda x: x[1:], elems)
        _, outs = lax.scan(step, first, rest)
        return jax.tree_util.tree_map(
            lambda f, o: jnp.concatenate([f[None], o]), first, outs
        )
    L = math.isqrt(T - 1) + 1
    C = -(-T // L)
    pad = C * L - T

    def chunk(x):
        # Pad by repeating the last element (results past T are discarded).
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
        return jnp.swapaxes(x.reshape((C, L) + x.shape[1:]), 0, 1)  # (L, C, ...)

    chunks = jax.tree_util.tree_map(chunk, elems)
    first = jax.tree_util.tree_map(lambda x: x[0], chunks)
    rest = jax.tree_util.tree_map(lambda x: x[1:], chunks)

    def local(carry, x):
        out = fn(carry, x)
        return out, out

    totals, prefixes = lax.scan(local, first, rest)
    prefixes = jax.tree_util.tree_map(
        lambda f, p: jnp.concatenate([f[None], p]), first, prefixes
    )  # (L, C, ...) local inclusive prefixes

    def across(carry, total):
        out = fn(carry, total)
        return out, carry

    # Exclusive prefixes of the chunk totals: chunk c starts after chunks 0..c-1.
    totals_first = jax.tree_util.tree_map(lambda x: x[0], totals)
    totals_rest = jax.tree_util.tree_map(lambda x: x[1:], totals)
    _, starts = lax.scan(across, totals_first, totals_rest)  # starts for chunks 1..C-1

    def combine_chunk(start, prefix):
        return jax.vmap(lambda p: fn(start, p))(prefix)

    # Chunk 0 keeps its local prefixes; the others are combined with their start.
    prefixes_rest = jax.tree_util.tree_map(lambda p: jnp.swapaxes(p[:, 1:], 0, 1), prefixes)
    combined = jax.vmap(combine_chunk)(starts, prefixes_rest)  # (C-1, L, ...)
    out = jax.tree_util.tree_map(
        lambda p, c: jnp.concatenate([jnp.swapaxes(p[:, :1], 0, 1), c]).reshape(
            (C * L,) + p.shape[2:]
        )[:T],
        prefixes,
        combined,
    )
    return out


def _sharded_associative_scan(fn, elems, method: Method, sharding: TimeSharding):
    T = jtu.tree_leaves(elems)[0].shape[0]
    padded = sharding.pad(elems)

    def local(elems, _):
        prefixes = associative_scan(fn, elems, method)
        total = jtu.tree_map(lambda x: x[-1], prefixes)
        before, has_before = sharding.exclusive_prefix(fn, total, reverse=False)
        combined = jax.vmap(lambda p: fn(before, p))(prefixes)
        return jtu.tree_map(lambda c, p: jnp.where(has_before, c, p), combined, prefixes)

    out = sharding.map(local, padded)
    return jtu.tree_map(lambda x: x[:T], out)


def _default_method() -> Literal["chunked", "associative"]:
    # On CPUs the chunked form does less work and compiles much faster; on GPUs/TPUs the
    # associative scan's O(log T) depth is what makes long sequences fast.
    return "chunked" if jax.default_backend() == "cpu" else "associative"


_METHODS = {"associative": _associative, "chunked": _chunked, "sequential": _sequential}


def linear_recurrence(
    A: Float[Array, "T D D"] | Float[Array, "T D"],
    b: Float[Array, "T D"],
    x0: Float[Array, " D"] | None = None,
    *,
    transpose: bool = False,
    method: Method = "auto",
    mesh: Mesh | None = None,
    axis_name: str | None = None,
) -> Float[Array, "T D"]:
    r"""Solves a linear recurrence in parallel over its length.

    Forward (`transpose=False`): returns $x_0, \dots, x_{T-1}$ with

    $$x_k = A_k x_{k-1} + b_k, \qquad x_{-1} = x_0^{\text{init}}\ (\text{default } 0).$$

    This is the solution of the block-bidiagonal system $L x = b$ (plus the initial
    condition), $(Lx)_k = x_k - A_k x_{k-1}$. With `transpose=True` it instead solves the
    transposed system $L^\top \lambda = b$, i.e. the reverse recurrence

    $$\lambda_k = A_{k+1}^\top \lambda_{k+1} + b_k, \qquad \lambda_T = 0,$$

    which is what reverse-mode differentiation (adjoint methods) needs.

    **Methods.** `"associative"`: `jax.lax.associative_scan` over the affine maps
    $x \mapsto A_k x + b_k$, composed as
    $(A_i, b_i) \circ (A_j, b_j) = (A_j A_i,\ A_j b_i + b_j)$ -- $O(\log T)$ depth, the
    right choice on GPUs and TPUs. `"chunked"`: $\sqrt{T}$ chunks swept in three
    passes vectorised over the chunks -- $O(T)$ work and $O(\sqrt T)$ depth, faster and
    much quicker to compile on CPUs. `"sequential"`: a plain `jax.lax.scan`, for
    reference. `"auto"` (default): chunked on CPU, associative elsewhere. All give the
    same result up to round-off.

    **Arguments:**

    - `A`: transition matrices, dense with shape `(T, D, D)` or diagonal with shape
        `(T, D)` (the diagonal case costs $O(TD)$ and is used by quasi-DEER).
    - `b`: offsets, shape `(T, D)`.
    - `x0`: initial state $x_{-1}$ of shape `(D,)`; only for the forward recurrence.
    - `transpose`: solve the transposed system instead (see above).
    - `method`: see above.
    - `mesh`, `axis_name`: shard the time axis over the mesh axis `axis_name` of the
        `jax.sharding.Mesh` `mesh` (default: its only axis): each device solves its
        slice, with one all-gather of the slices' aggregate maps (see
        [`diffrax_deer.DEER`][]'s "many devices"). Default: one device.

    **Returns:**

    The states, shape `(T, D)`.

    !!! example

        ```python
        A = jnp.full((1000, 1), 0.9)          # diagonal, D = 1
        b = jnp.ones((1000, 1))
        x = diffrax_deer.linear_recurrence(A, b, jnp.zeros(1))
        # x[k] = 0.9 x[k-1] + 1, x[-1] -> 10
        ```
    """
    sharding = time_sharding(mesh, axis_name, "linear_recurrence")
    return solve_linear_recurrence(A, b, x0, transpose=transpose, method=method, sharding=sharding)


def solve_linear_recurrence(
    A: Float[Array, "T D D"] | Float[Array, "T D"],
    b: Float[Array, "T D"],
    x0: Float[Array, " D"] | None = None,
    *,
    transpose: bool = False,
    method: Method = "auto",
    sharding: TimeSharding | None = None,
) -> Float[Array, "T D"]:
    """[`diffrax_deer.linear_recurrence`][] with its sharding as a `TimeSharding`
    (what the problems of this package carry)."""
    diagonal = _is_diagonal(A, b)
    if method == "auto":
        method = _default_method()
    if method not in _METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {list(_METHODS)}.")
    if transpose and x0 is not None:
        raise ValueError("`x0` is only meaningful for the forward recurrence.")
    if sharding is not None:
        return _sharded_linear_recurrence(A, b, x0, transpose, method, sharding)
    solve = _METHODS[method]
    if transpose:
        At = A if diagonal else jnp.swapaxes(A, -1, -2)
        # lambda_k = A_{k+1}^T lambda_{k+1} + b_k is the forward recurrence read
        # backwards; the last transition (A_T, which meets lambda_T = 0) is unused.
        At = jnp.concatenate([jnp.zeros_like(At[:1]), At[:0:-1]])
        return solve(At, b[::-1])[::-1]
    if x0 is not None:
        b = b.at[0].add(matvec(A[0], x0))
    return solve(A, b)


def _pieces(A, b, method: Method):
    if method == "chunked":
        return _chunked_pieces(A, b)
    return _prefix_pieces(A, b, method)


def _sharded_linear_recurrence(A, b, x0, transpose: bool, method: Method, sharding: TimeSharding):
    """Each device's slice in pieces (`_pieces`); the state before it from the
    all-gathered aggregates of the slices before it (after it, transposed); then the
    slice from that state. The transposed recurrence's transitions are the next
    states' (`A_{k+1}^T`): the first of the next slice comes by one neighbour
    exchange."""
    T, D = b.shape
    diagonal = A.ndim == b.ndim
    A, b = sharding.pad((A, b))  # zero maps: no effect on the states before
    x0 = jnp.zeros(D, b.dtype) if x0 is None else x0

    def local(slices, x0):
        A, b = slices
        if transpose:
            A = jnp.concatenate([A[1:], sharding.next_first(A)[None]])
            A = A if diagonal else jnp.swapaxes(A, -1, -2)
            A, b = A[::-1], b[::-1]
        aggregate, finish = _pieces(A, b, method)
        (M, c), has_before = sharding.exclusive_prefix(_combine, aggregate(), reverse=transpose)
        x = finish(jnp.where(has_before, matvec(M, x0) + c, x0))
        return x[::-1] if transpose else x

    return sharding.map(local, (A, b), x0)[:T]


def sequential_linear_recurrence(
    A: Array, b: Array, x0: Array | None = None, *, transpose: bool = False
) -> Array:
    """[`diffrax_deer.linear_recurrence`][] with `method="sequential"`."""
    return linear_recurrence(A, b, x0, transpose=transpose, method="sequential")
