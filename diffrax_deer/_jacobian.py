r"""Values and Jacobians of a per-point map $y \mapsto F(p, y)$ along a whole grid.

One batched pass gives both $F$ and $\partial F / \partial y$ at every point: the dense
Jacobian as $D$ Jacobian-vector products with the basis vectors (forward mode, sharing
one evaluation of $F$), or only its diagonal (quasi-DEER) without ever forming a
`(T, D, D)` array.

Reverse mode through the dense Jacobian (the gradients of the exponential scheme need
it) is second order. Differentiating the forward-mode Jacobian backwards
(reverse-over-forward, JAX's default) measured twice as slow on CPU as the other way
round, so its cotangent is computed forward-over-reverse: for cotangents
$(\bar F, \bar J)$,

$$\nabla \Big( \langle \bar F, F \rangle + \sum_j \langle \bar J_{:, j},
\partial F / \partial y\, e_j \rangle \Big)
= \nabla \langle \bar F, F \rangle + \sum_j \partial_\varepsilon\, \nabla
\langle \bar J_{:, j}, F(y + \varepsilon e_j) \rangle,$$

one reverse pass per basis direction, each differentiated forwards along $e_j$
(neural ODE, D = 4, T = 1e4: 25 ms against 49 ms). The $D$ directions run as one batch
of $D T$ (point, direction) pairs, so that the parameters' cotangent is one sum over all
pairs. On CPU both second-order passes (this one and forward-over-forward) run over
chunks of points, which keeps their intermediates in cache (2.5-4x faster at T = 1e4;
see `_over_chunks`).
"""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from ._misc import batched_like, cotangents_for, is_undefined, no_cotangents
from ._sharding import TimeSharding


def value_and_jacobian(
    fn: Callable[[PyTree, Array], Array],
    points: PyTree,
    ys: Float[Array, "T D"],
    structure: Literal["dense", "diagonal"] = "dense",
    sharding: TimeSharding | None = None,
) -> tuple[Float[Array, "T D"], Float[Array, "T D D"] | Float[Array, "T D"]]:
    """`fn(point, y) -> (D,)` evaluated at every `(points[k], ys[k])`, with its
    Jacobian with respect to `y`: dense `(T, D, D)` or diagonal `(T, D)`. `sharding`:
    how the points are sharded over devices (see `_over_chunks`), or None."""
    D = ys.shape[-1]
    eye = jnp.eye(D, dtype=ys.dtype)
    if structure == "dense":
        return _dense(fn, points, ys, sharding)
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


def _dense_impl(fn, points, ys):
    eye = jnp.eye(ys.shape[-1], dtype=ys.dtype)

    def one(p, y):
        f = lambda y: fn(p, y)
        jvp = lambda v: jax.jvp(f, (y,), (v,))
        # (`out_axes=0` and the first copy rather than `None`: under differentiation
        # with respect to batched parameters the value can be reported as batched
        # along the basis; XLA simplifies the copy away.)
        values, columns = jax.vmap(jvp, out_axes=(0, -1))(eye)
        return values[0], columns

    return jax.vmap(one)(points, ys)


@eqx.filter_custom_jvp
def _dense(fn, points, ys, sharding):
    del sharding
    return _dense_impl(fn, points, ys)


@_dense.def_jvp
def _dense_jvp(primals, tangents):
    out = _dense_impl(*primals[:3])
    if all(t is None for t in jtu.tree_leaves(tangents)):
        return out, jtu.tree_map(jnp.zeros_like, out)
    tangents = batched_like(tangents, primals[2])
    t_out = eqxi.filter_primitive_bind(_tangent_p, primals, tangents)
    return out, tuple(t_out)


@eqxi.filter_primitive_def
def _tangent_impl(primals, tangents):
    # Forward mode: forward-over-forward, along the perturbed leaves only (None
    # tangents stay symbolic zeros: a product along the trajectory alone does not
    # differentiate through the parameters), in chunks of points on CPU.
    fn, points, ys, sharding = primals
    t_fn, t_points, t_ys, _ = tangents

    def chunk(points, ys, t_chunk):
        t_points, t_ys = t_chunk
        out, t_out = eqx.filter_jvp(
            lambda *p: _dense_impl(*p), (fn, points, ys), (t_fn, t_points, t_ys)
        )
        # (An output that does not depend on the perturbed leaves -- the Jacobian,
        # when a parameter enters additively -- has a symbolic-zero tangent.)
        return (), tuple(jnp.zeros_like(o) if t is None else t for o, t in zip(out, t_out, strict=True))

    _, t_out = _over_chunks(chunk, points, ys, (t_points, t_ys), sharding)
    return list(t_out)


@eqxi.filter_primitive_def
def _tangent_abstract_eval(primals, tangents):
    del tangents
    ys = primals[2]
    T, D = ys.shape
    shaped = jax.core.ShapedArray  # pyright: ignore[reportAttributeAccessIssue]
    return [shaped((T, D), ys.dtype), shaped((T, D, D), ys.dtype)]


@eqxi.filter_primitive_jvp
def _tangent_jvp(primals, tangents):
    raise NotImplementedError(
        "diffrax_deer: third derivatives through a Jacobian are not supported."
    )


# Points per chunk of the second-order passes on CPU (see `_over_chunks`); the reverse
# pass, which evaluates all D directions of a chunk as one batch, takes 4 * _CHUNK / D
# points (2048 point-directions).
_CHUNK = 512


def _over_chunks(fn, points, ys, cts, sharding: TimeSharding | None = None, chunk=None):
    """`fn(points, ys, cts) -> (total, per_point)` over the whole grid, evaluated in
    chunks of `chunk` (default `_CHUNK`) points on CPU: `total` (a PyTree of sums over
    points) is summed over the chunks, `per_point` (leading axis the points)
    concatenated.

    The second-order passes through the vector field keep several `(T, hidden)`
    intermediates per basis direction alive at once; once they outgrow the CPU's
    caches the pass slows by 2-3x (measured, neural ODE D = 4, T = 1e4: 34 ms whole,
    13 ms in chunks of 512; D = 16: 145 ms against 55 ms). On other backends, or for
    short grids, one pass over everything. Padding: the last point repeated, with
    zero cotangents, so padded points add nothing to `total`.

    With `sharding` (the grid sharded over P devices) the grid is split into P slices,
    one per device, each swept in its own chunks (one chunk on other backends): the
    loop over chunks runs on every device at once, over its own points (a loop over
    the chunks of the whole grid would gather it onto every device)."""
    T = ys.shape[0]
    chunk = _CHUNK if chunk is None else chunk
    devices = 1 if sharding is None else sharding.num_shards
    cpu = jax.default_backend() == "cpu"
    if sharding is None and (not cpu or T <= 2 * chunk):
        return fn(points, ys, cts)
    per_device = -(-T // devices)
    size = min(chunk, per_device) if cpu else per_device
    C = -(-per_device // size)
    pad = devices * C * size - T

    lead = (C, size) if sharding is None else (devices, C, size)

    def split(x, mode):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=mode)
        x = x.reshape(*lead, *x.shape[1:])
        return x if sharding is None else sharding.constrain(x)

    points, ys = jtu.tree_map(lambda x: split(x, "edge"), (points, ys))
    cts = jtu.tree_map(lambda x: split(x, "constant"), cts)
    first = (0,) * (len(lead) - 1)
    total_shape = eqx.filter_eval_shape(
        lambda p, y, c: fn(p, y, c)[0], *jtu.tree_map(lambda x: x[first], (points, ys, cts))
    )
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), total_shape)

    def body(total, chunk):
        t, per_point = fn(*chunk)
        return jtu.tree_map(jnp.add, total, t), per_point

    def sweep(points, ys, cts):  # one device's chunks
        return lax.scan(body, zeros, (points, ys, cts))

    if sharding is None:
        total, per_point = sweep(points, ys, cts)
    else:
        total, per_point = jax.vmap(sweep)(points, ys, cts)
        total = jtu.tree_map(lambda x: jnp.sum(x, axis=0), total)
    per_point = jtu.tree_map(lambda x: x.reshape(-1, *x.shape[len(lead):])[:T], per_point)
    return total, per_point


@eqxi.filter_primitive_transpose(materialise_zeros=True)  # pyright: ignore[reportCallIssue]
def _tangent_transpose(inputs, cts_out):
    # Reverse mode: forward-over-reverse (see module doc).
    primals, tangents = inputs
    if any(is_undefined(x) for x in jtu.tree_leaves(primals)):
        raise NotImplementedError("The Jacobian's tangent is linear in the tangents only.")
    fn, points, ys, sharding = primals
    fn_dynamic, fn_static = eqx.partition(fn, eqx.is_inexact_array)
    D = ys.shape[-1]
    eye = jnp.eye(D, dtype=ys.dtype)

    def chunk(points, ys, cts):
        ct_F, ct_J = cts
        n = ys.shape[0]
        p_dynamic, p_static = eqx.partition(points, eqx.is_inexact_array)

        def values(d_fn, d_points, ys):
            fn = eqx.combine(d_fn, fn_static)
            return jax.vmap(fn)(eqx.combine(d_points, p_static), ys)

        def pullback(ct, ys, d_points=p_dynamic):
            return eqx.filter_vjp(values, fn_dynamic, d_points, ys)[1](ct)

        # All D directions as one batch of D * n (point, direction) pairs, point k
        # with direction e_j at j * n + k: the parameters' cotangent is then one sum
        # over the pairs, not D separate sums (XLA's CPU backend runs a batch of D
        # small contractions much slower than one large one; neural ODE D = 4, T = 1e4:
        # 32 -> 23 ms; D = 16: 102 -> 81 ms).
        tile = lambda x: jnp.broadcast_to(x[None], (D,) + x.shape).reshape((D * n,) + x.shape[1:])
        ct_pairs = jnp.moveaxis(ct_J, -1, 0).reshape(D * n, D)
        directions = jnp.broadcast_to(eye[:, None, :], (D, n, D)).reshape(D * n, D)
        points_pairs = jtu.tree_map(tile, p_dynamic)
        columns = eqx.filter_jvp(
            lambda ys: pullback(ct_pairs, ys, points_pairs), (tile(ys),), (directions,)
        )[1]
        base = pullback(ct_F, ys)
        # (A leaf whose pullback does not depend on y has a symbolic-zero column.)
        fold = lambda x: jnp.sum(x.reshape((D, n) + x.shape[1:]), axis=0)
        c_fn, c_points, c_ys = columns
        columns = (c_fn, jtu.tree_map(fold, c_points), jtu.tree_map(fold, c_ys))
        add = lambda b, c: b if c is None else b + c
        d_fn, d_points, d_ys = jtu.tree_map(add, base, columns, is_leaf=_is_none)
        return _zeros_for_none(d_fn, fn_dynamic), (d_points, d_ys)

    d_fn, (d_points, d_ys) = _over_chunks(
        chunk, points, ys, tuple(cts_out), sharding, chunk=max(1, 4 * _CHUNK // D)
    )
    d_fn = eqx.combine(d_fn, jtu.tree_map(lambda _: None, fn_static))
    return no_cotangents(primals), cotangents_for(tangents, (d_fn, d_points, d_ys, tangents[3]))


def _is_none(x):
    return x is None


def _zeros_for_none(grads, like):
    """`grads` with zeros where a leaf of `like` has no gradient (so that the chunks'
    sums have a fixed structure)."""
    return jtu.tree_map(
        lambda g, x: jnp.zeros_like(x) if g is None and x is not None else g,
        grads, like, is_leaf=_is_none,
    )


_tangent_p = eqxi.create_vprim(
    "diffrax_deer_jacobian_tangent",
    _tangent_impl,
    _tangent_abstract_eval,
    _tangent_jvp,
    _tangent_transpose,
)
