r"""Linear recurrences $x_k = A_k x_{k-1} + b_k$, solved by a parallel associative scan.

This is the parallel core that every method in this package reduces to: each Newton
iteration (DEER, quasi-DEER, ...) and each implicit-differentiation solve is one call
to [`diffrax_deer.linear_recurrence`][].
"""

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._batched import matmul, matvec


def _is_diagonal(A: Array, b: Array) -> bool:
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


def _combine(earlier, later):
    A_i, b_i = earlier
    A_j, b_j = later
    if A_i.ndim == b_i.ndim:  # diagonal
        return A_j * A_i, A_j * b_i + b_j
    return matmul(A_j, A_i), matvec(A_j, b_i) + b_j


def linear_recurrence(
    A: Float[Array, "T D D"] | Float[Array, "T D"],
    b: Float[Array, "T D"],
    x0: Float[Array, " D"] | None = None,
    *,
    transpose: bool = False,
) -> Float[Array, "T D"]:
    r"""Solves a linear recurrence in parallel over its length.

    Forward (`transpose=False`): returns $x_0, \dots, x_{T-1}$ with

    $$x_k = A_k x_{k-1} + b_k, \qquad x_{-1} = x_0^{\text{init}}\ (\text{default } 0).$$

    This is the solution of the block-bidiagonal system $L x = b$ (plus the initial
    condition), $(Lx)_k = x_k - A_k x_{k-1}$. With `transpose=True` it instead solves the
    transposed system $L^\top \lambda = b$, i.e. the reverse recurrence

    $$\lambda_k = A_{k+1}^\top \lambda_{k+1} + b_k, \qquad \lambda_T = 0,$$

    which is what reverse-mode differentiation (adjoint methods) needs.

    Both are computed with `jax.lax.associative_scan` over the affine maps
    $x \mapsto A_k x + b_k$, composed as
    $(A_i, b_i) \circ (A_j, b_j) = (A_j A_i,\ A_j b_i + b_j)$: $O(\log T)$ depth on
    parallel hardware.

    **Arguments:**

    - `A`: transition matrices, dense with shape `(T, D, D)` or diagonal with shape
        `(T, D)` (the diagonal case costs $O(TD)$ and is used by quasi-DEER).
    - `b`: offsets, shape `(T, D)`.
    - `x0`: initial state $x_{-1}$ of shape `(D,)`; only for the forward recurrence.
    - `transpose`: solve the transposed system instead (see above).

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
    diagonal = _is_diagonal(A, b)
    if transpose:
        if x0 is not None:
            raise ValueError("`x0` is only meaningful for the forward recurrence.")
        At = A if diagonal else jnp.swapaxes(A, -1, -2)
        # lambda_k = A_{k+1}^T lambda_{k+1} + b_k; the last transition is never used.
        At = jnp.concatenate([At[1:], jnp.zeros_like(At[:1])])
        _, out = lax.associative_scan(_combine, (At, b), reverse=True)
        return out
    if x0 is not None:
        b = b.at[0].add(matvec(A[0], x0))
    _, out = lax.associative_scan(_combine, (A, b))
    return out


def sequential_linear_recurrence(
    A: Array, b: Array, x0: Array | None = None, *, transpose: bool = False
) -> Array:
    """The same as [`diffrax_deer.linear_recurrence`][], evaluated with a sequential
    `jax.lax.scan`. A reference implementation for tests, and the cheaper choice on a
    single CPU core for very small `D`."""
    diagonal = _is_diagonal(A, b)
    if transpose:
        At = A if diagonal else jnp.swapaxes(A, -1, -2)
        At = jnp.concatenate([At[1:], jnp.zeros_like(At[:1])])

        def rstep(lam, inp):
            a, bk = inp
            lam = matvec(a, lam) + bk
            return lam, lam

        _, out = lax.scan(rstep, jnp.zeros_like(b[0]), (At, b), reverse=True)
        return out
    x = jnp.zeros_like(b[0]) if x0 is None else x0

    def step(x, inp):
        a, bk = inp
        x = matvec(a, x) + bk
        return x, x

    _, out = lax.scan(step, x, (A, b))
    return out

