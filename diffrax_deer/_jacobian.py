r"""Values and Jacobians of a per-point map $y \mapsto F(p, y)$ along a whole grid.

One batched pass gives both $F$ and $\partial F / \partial y$ at every point: the dense
Jacobian as $D$ Jacobian-vector products with the basis vectors (forward mode, sharing
one evaluation of $F$), or only its diagonal (quasi-DEER) without ever forming a
`(T, D, D)` array.
"""

from collections.abc import Callable
from typing import Literal

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree


def value_and_jacobian(
    fn: Callable[[PyTree, Array], Array],
    points: PyTree,
    ys: Float[Array, "T D"],
    structure: Literal["dense", "diagonal"] = "dense",
) -> tuple[Float[Array, "T D"], Float[Array, "T D D"] | Float[Array, "T D"]]:
    """`fn(point, y) -> (D,)` evaluated at every `(points[k], ys[k])`, with its
    Jacobian with respect to `y`: dense `(T, D, D)` or diagonal `(T, D)`."""
    D = ys.shape[-1]
    eye = jnp.eye(D, dtype=ys.dtype)
    if structure == "dense":

        def one(p, y):
            f = lambda y: fn(p, y)
            jvp = lambda v: jax.jvp(f, (y,), (v,))
            return jax.vmap(jvp, out_axes=(None, -1))(eye)

        return jax.vmap(one)(points, ys)
    if structure != "diagonal":
        raise ValueError(f"Unknown Jacobian structure {structure!r}.")
    batched = jax.vmap(fn)
    # Evaluate (and linearise) once; then one cheap linear map per basis direction.
    values, linear = jax.linearize(lambda y: batched(points, y), ys)
    if D == 1:
        return values, linear(jnp.ones_like(ys))

    # One basis direction at a time, at every point at once: O(T D) memory.
    def column(j, diag):
        out = linear(jnp.broadcast_to(eye[j], ys.shape))
        return diag.at[:, j].set(out[:, j])

    return values, lax.fori_loop(0, D, column, jnp.zeros_like(ys))
