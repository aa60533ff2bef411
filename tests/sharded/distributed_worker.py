"""One of two processes of `tests/test_sharding.py::test_two_processes`: the same
sharded solves under `jax.distributed` (one CPU device per process, JAX's CPU
collectives between them), checked against this process's own unsharded solves.

Usage: python distributed_worker.py PROCESS_ID PORT"""

import functools as ft
import sys

import jax


jax.config.update("jax_enable_x64", True)
jax.distributed.initialize(
    coordinator_address=f"localhost:{sys.argv[2]}", num_processes=2,
    process_id=int(sys.argv[1]), local_device_ids=[0],
)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import diffrax_deer  # noqa: E402


def main():
    assert jax.device_count() == 2 and jax.local_device_count() == 1
    mesh = jax.make_mesh((2,), ("time",))
    term = diffrax.ODETerm(lambda t, y, a: jnp.stack([y[1], -a * jnp.sin(y[0])]))

    def deer(mesh, a):
        sol = diffrax.diffeqsolve(
            term, diffrax_deer.DEER(num_points=301, mesh=mesh), 0.0, 4.0, 4.0,
            jnp.array([1.0, 0.0]), args=a, saveat=diffrax.SaveAt(ts=jnp.linspace(0, 4, 5)),
        )
        return jnp.sum(sol.ys**2)  # type: ignore

    cell = eqx.nn.GRUCell(2, 4, key=jax.random.PRNGKey(0))
    xs = jax.random.normal(jax.random.PRNGKey(1), (200, 2))

    def gru(mesh, xs):
        step = lambda h, x: (cell(x, h), cell(x, h))
        final, ys = diffrax_deer.scan(step, jnp.zeros(4), xs, mesh=mesh)
        return jnp.sum(final) + jnp.sum(ys**2)

    errors = []
    # DEER's value; the scan's value and gradient (with respect to the sharded `xs`).
    for fn, arg, grad in ((deer, 2.0, False), (gru, xs, True)):
        transform = jax.value_and_grad if grad else lambda f: f
        value = jax.jit(transform(ft.partial(fn, mesh)))(arg)
        local = jax.jit(transform(ft.partial(fn, None)))(arg)
        # Gather the pieces (the gradient with respect to `xs` is sharded).
        value = multihost_utils.process_allgather(value, tiled=True)
        pairs = zip(jax.tree_util.tree_leaves(value), jax.tree_util.tree_leaves(local), strict=True)
        errors.append(max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs))
    print("errors", errors, flush=True)
    assert max(errors) < 1e-12, errors


if __name__ == "__main__":
    main()
