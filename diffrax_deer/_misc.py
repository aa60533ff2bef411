"""Small shared helpers: flattening PyTree states to vectors, default tolerances,
tracing a function once."""

import functools as ft
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree


class TreeFlattener(eqx.Module):
    """Maps a PyTree state with floating leaves of any shapes to a flat `(D,)` vector
    and back. Built from an example state; all leaves must share one floating dtype.
    Works on stacked states too (`ravel_stacked` / `unravel_stacked`), with the
    stacking axes in front."""

    treedef: Any = eqx.field(static=True)  # a `jax.tree_util.PyTreeDef`
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    def __init__(self, tree: PyTree[Array], what: str = "y0"):
        leaves, self.treedef = jtu.tree_flatten(tree)
        if len(leaves) == 0:
            raise ValueError(f"`{what}` must contain at least one array.")
        dtypes = {jnp.result_type(x) for x in leaves}
        for dt in dtypes:
            if not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(
                    f"Every leaf of `{what}` must be a real floating-point array (the "
                    f"Newton iteration differentiates through it); got dtype {dt}."
                )
        if len(dtypes) > 1:
            raise TypeError(
                f"All leaves of `{what}` must share one dtype; got {sorted(map(str, dtypes))}."
            )
        self.shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
        self.dtype = dtypes.pop()

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def ravel(self, tree: PyTree[Array]) -> Array:
        leaves = jtu.tree_leaves(tree)
        return jnp.concatenate([jnp.reshape(x, (-1,)) for x in leaves]).astype(
            self.dtype
        )

    def unravel(self, flat: Array) -> PyTree[Array]:
        return self.unravel_stacked(flat)

    def ravel_stacked(self, tree: PyTree[Array], ndim: int = 1) -> Array:
        leaves = jtu.tree_leaves(tree)
        lead = jnp.shape(leaves[0])[:ndim]
        return jnp.concatenate(
            [jnp.reshape(x, lead + (-1,)) for x in leaves], axis=-1
        ).astype(self.dtype)

    def unravel_stacked(self, flat: Array) -> PyTree[Array]:
        lead = flat.shape[:-1]
        leaves = []
        start = 0
        for shape in self.shapes:
            size = math.prod(shape)
            leaves.append(jnp.reshape(flat[..., start : start + size], lead + shape))
            start += size
        return jtu.tree_unflatten(self.treedef, leaves)


def default_tolerance(dtype) -> float:
    """Newton tolerance used when `rtol`/`atol` are not given: 1e-8 in float64, about
    2e-5 in float32 (a few hundred ulps: tighter would chase round-off)."""
    eps = float(jnp.finfo(dtype).eps)
    return max(1e-8, 160 * eps)


def traced_once(fn: Callable) -> Callable:
    """`fn`, its trace cached per static arguments and array shapes: the Python body
    runs once per distinct call signature and is inlined (`jax.jit(inline=True)`, no
    call boundary in the compiled program) wherever it is called again.

    For the library's expensive traces that JAX and its libraries trace more than once:
    diffrax traces a solver's `step` three times (twice under `eval_shape`, for the
    structure of its loop state), and equinox's checkpointed loop traces a reverse pass
    twice (once under `eval_shape`, to resolve symbolic zeros). Arrays anywhere in the
    arguments are traced; everything else must be hashable (a call whose static part
    is not falls back to plain `fn`). Closed-over arrays of an enclosing trace are
    handled by `jax.jit` as usual."""

    @ft.partial(jax.jit, static_argnums=(0, 1), inline=True)
    def run(static_leaves, static_treedef, dynamic):
        static = jtu.tree_unflatten(static_treedef, static_leaves)
        out = fn(*eqx.combine(dynamic, static))
        dynamic_out, static_out = eqx.partition(out, eqx.is_array)
        return dynamic_out, eqxi.Static(static_out)

    @ft.wraps(fn)
    def wrapper(*args):
        dynamic, static = eqx.partition(args, eqx.is_array)
        static_leaves, static_treedef = jtu.tree_flatten(static)
        static_leaves = tuple(static_leaves)
        try:
            hash(static_leaves)
        except TypeError:
            return fn(*args)
        dynamic_out, static_out = run(static_leaves, static_treedef, dynamic)
        return eqx.combine(dynamic_out, static_out.value)

    return wrapper


def batched_like(tangents: PyTree, reference: Array) -> PyTree:
    """`tangents`, each leaf multiplied by a one that is batched (under `jax.vmap`)
    wherever `reference` is.

    For the tangent inputs of this library's linear primitives (equinox "vprims": the
    implicit derivative, the Jacobian's tangent, the Fréchet derivative). Their
    transposes are vmapped by equinox with each cotangent batched like its input, so
    an unbatched tangent against batched residuals -- a gradient with respect to
    parameters shared by a batch of solves, the usual training setup -- cannot be
    transposed (its cotangent must be summed over the batch). After this product the
    tangent is batched, and JAX sums the cotangent when it transposes the product.
    Outside `vmap` the factor is an exact 1 (a `where`, never arithmetic on
    `reference`), folded away by XLA."""
    one = jnp.where(True, 1, jnp.ravel(reference)[0])
    return jtu.tree_map(lambda t: t * one.astype(t.dtype), tangents)


def is_undefined(x) -> bool:
    """Whether `x` is the input a transpose rule is asked the cotangent of."""
    return isinstance(x, jax.interpreters.ad.UndefinedPrimal)  # pyright: ignore[reportAttributeAccessIssue]


def cotangents_for(tangents: PyTree, grads: PyTree) -> PyTree:
    """A transpose rule's cotangents for the linear input `tangents`: the matching leaf
    of `grads` (zeros where it is None) for each undefined leaf, None elsewhere."""

    def leaf(t, g):
        if not is_undefined(t):
            return None
        return jnp.zeros(t.aval.shape, t.aval.dtype) if g is None else g

    is_leaf = lambda x: x is None or is_undefined(x)
    return jtu.tree_map(leaf, tangents, grads, is_leaf=is_leaf)


def no_cotangents(tree: PyTree) -> PyTree:
    """None for every leaf of a transpose rule's non-linear input."""
    return jtu.tree_map(lambda _: None, tree, is_leaf=is_undefined)


def error_if(x: Array, pred, messages: str | list[str], index=None) -> Array:
    """`x`, raising at run time with `messages` (one, or the `index`-th) if `pred`:
    `equinox.error_if` / `branched_error_if`, checked on `x`'s first row alone. (On
    all of `x`, the check's host callback pins `x` to one device: a trajectory
    sharded along time would be gathered there.)"""
    first = x[:1]
    if isinstance(messages, str):
        first = eqx.error_if(first, pred, messages)
    else:
        first = eqx.branched_error_if(first, pred, jnp.asarray(index), messages)
    return lax.dynamic_update_slice_in_dim(x, first, 0, axis=0)
