r"""Sequence parallelism: one trajectory's time axis sharded across devices.

A trajectory problem's work is of two kinds. Everything pointwise in time (the vector
field and its Jacobians, the exponentials, residuals, norms) is elementwise along the
time axis: sharded along it, XLA's SPMD partitioner runs each device's slice locally
and reduces the norms across devices. What couples the states is the parallel scan
([`diffrax_deer.linear_recurrence`][] and the associative scans of ELK and the Lyapunov
diagnostic). Sharded, it runs under `jax.shard_map` as

1. each device's scan of its own slice of length $T/P$, which also gives the slice's
   aggregate (for a linear recurrence, the affine map $x \mapsto M x + c$ taking the
   state before the slice to its last state);
2. one exchange: an all-gather of the $P$ aggregates ($(D, D)$ and $(D,)$ each), from
   which each device composes the state before its own slice (a scan of length $P$);
3. a local fix-up of the slice from that state.

The transposed recurrence (reverse-mode derivatives) is the same, backwards, with one
neighbour exchange of a boundary transition. Grids that $P$ does not divide are padded
at the end (with transitions and offsets that leave the answer unchanged).

[`diffrax_deer.DEER`][] and [`diffrax_deer.scan`][] take `mesh=` (a
`jax.sharding.Mesh`) and `axis_name=` (the mesh axis to shard time over); the problem
they build carries a `TimeSharding`, and every scan of its solve, its coarse-grid
guess and its derivatives is sharded by it.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PyTree


class TimeSharding(eqx.Module):
    """Shard the leading (time) axis of a trajectory's arrays over the mesh axis
    `axis_name` of `mesh` (other mesh axes hold replicas, or a batch under
    `jax.vmap(..., spmd_axis_name=...)`)."""

    mesh: Mesh = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    @property
    def num_shards(self) -> int:
        return self.mesh.shape[self.axis_name]

    @property
    def spec(self) -> PartitionSpec:
        return PartitionSpec(self.axis_name)

    def constrain(self, tree: PyTree[Array]) -> PyTree[Array]:
        """`tree`'s arrays (time-major) sharded along time: a hint that keeps XLA's
        partitioner from gathering a trajectory onto one device."""
        _check_context()
        sharding = NamedSharding(self.mesh, self.spec)
        return jtu.tree_map(lambda x: lax.with_sharding_constraint(x, sharding), tree)

    def pad(self, tree: PyTree[Array]) -> PyTree[Array]:
        """`tree`'s arrays padded with zeros at the end of the time axis to a multiple
        of the number of shards."""
        T = jtu.tree_leaves(tree)[0].shape[0]
        pad = -T % self.num_shards
        return jtu.tree_map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), tree)

    def map(self, fn: Callable, sharded: PyTree[Array], replicated: PyTree[Array] = ()):
        """`fn(sharded_slice, replicated)` on each device, under `jax.shard_map`: the
        leading axis of `sharded` split over `axis_name`, `replicated` whole on every
        device; the outputs are time-major and concatenated along time."""
        _check_context()
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=(self.spec, PartitionSpec()),
            out_specs=self.spec,
            check_vma=False,
        )(sharded, replicated)

    def exclusive_prefix(self, combine: Callable, total: PyTree[Array], reverse: bool):
        """Inside `map`: the combination (by the associative `combine(earlier,
        later)`) of the `total`s of the slices before this device's (after it, when
        `reverse`), and whether there are any (false on the first device). One
        all-gather of the `P` totals, then a scan of length `P` on every device."""
        totals = jtu.tree_map(lambda x: lax.all_gather(x, self.axis_name), total)
        index = lax.axis_index(self.axis_name)
        if reverse:
            totals = jtu.tree_map(lambda x: jnp.flip(x, axis=0), totals)
            index = self.num_shards - 1 - index

        def body(carry, x):
            out = combine(carry, x)
            return out, carry

        first = jtu.tree_map(lambda x: x[0], totals)
        rest = jtu.tree_map(lambda x: x[1:], totals)
        _, before = lax.scan(body, first, rest)  # before[i]: slices 0..i combined
        prev = jtu.tree_map(lambda x: x[jnp.maximum(index - 1, 0)], before)
        return prev, index > 0

    def next_first(self, x: Array) -> Array:
        """Inside `map`: the first row of the next device's slice (zeros on the last
        device), one neighbour exchange."""
        P = self.num_shards
        perm = [(i, i - 1) for i in range(1, P)]
        return lax.ppermute(x[0], self.axis_name, perm)


def time_sharding(mesh: Mesh | None, axis_name: str | None, who: str) -> TimeSharding | None:
    """The `TimeSharding` of `who(mesh=..., axis_name=...)`, checked; None without a
    mesh, or when its axis has one device."""
    if mesh is None:
        if axis_name is not None:
            raise ValueError(f"`{who}(axis_name=...)` needs `mesh=`.")
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`{who}(mesh=...)` must be a `jax.sharding.Mesh` (e.g. "
            f"`jax.make_mesh((jax.device_count(),), ('time',))`); got {type(mesh).__name__}."
        )
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"`{who}(mesh=...)` has axes {mesh.axis_names}: name the one to shard "
                f"time over with `axis_name=`."
            )
        axis_name = mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`{who}(axis_name={axis_name!r})` is not an axis of the mesh "
            f"{mesh.axis_names}."
        )
    if mesh.shape[axis_name] == 1:
        return None  # one device along time: nothing to shard
    # XLA's partitioner places the pointwise work ("auto" axes); `jax.make_mesh`'s
    # default "explicit" axes would make every array's sharding part of its type.
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
    return TimeSharding(auto, str(axis_name))


def _check_context() -> None:
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and AxisType.Explicit in context.axis_types:
        raise ValueError(
            "`mesh=` (of `DEER`, `scan`, `linear_recurrence`) shards time itself: call "
            "them outside `jax.set_mesh` of a mesh with explicit axes (or make that "
            "mesh's axes `jax.sharding.AxisType.Auto`)."
        )
