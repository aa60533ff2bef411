"""Sequence parallelism on 4 host devices: sharded results equal the unsharded ones.

Run by `tests/test_sharding.py` in a pytest session of its own with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (the rest of the suite keeps one
device); skipped elsewhere.
"""

import functools as ft

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import diffrax_deer


pytestmark = pytest.mark.skipif(
    jax.device_count() < 4, reason="needs 4 devices: run by tests/test_sharding.py"
)
P = 4
TOL = 1e-12


def mesh():
    return jax.make_mesh((P,), ("time",))


def assert_same(a, b, tol=TOL):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [61, 3])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_linear_recurrence(T, diagonal, transpose):
    keys = jax.random.split(jax.random.PRNGKey(T), 3)
    A = 0.5 * jax.random.normal(keys[0], (T, 3) if diagonal else (T, 3, 3))
    b = jax.random.normal(keys[1], (T, 3))
    x0 = None if transpose else jax.random.normal(keys[2], (3,))
    ref = diffrax_deer.sequential_linear_recurrence(A, b, x0, transpose=transpose)
    for method in ("chunked", "associative"):
        solve = ft.partial(
            diffrax_deer.linear_recurrence, transpose=transpose, method=method, mesh=mesh()
        )
        assert_same(jax.jit(solve)(A, b, x0), ref)


def pendulum(t, y, args):
    return jnp.stack([y[1], -args[0] * jnp.sin(y[0]) - args[1] * y[1]])


TERM = diffrax.ODETerm(pendulum)
Y0 = jnp.array([1.0, 0.0])
ARGS = (9.81, 0.3)
SAVE_TS = jnp.linspace(0.0, 3.0, 7)


def decay(t, y, args):
    return -args[1] * y - y**3 + jnp.sin(args[0] * t)


def deer_solve(
    solver, args=ARGS, y0=Y0, dt0=3.0, controller=None, adjoint=None, term=TERM
):
    return diffrax.diffeqsolve(
        term, solver, 0.0, 3.0, dt0, y0, args=args,
        saveat=diffrax.SaveAt(ts=SAVE_TS, dense=True),
        stepsize_controller=controller or diffrax.ConstantStepSize(),
        adjoint=adjoint or diffrax.RecursiveCheckpointAdjoint(),
    )


def outputs(sol):
    # The saved values, and the dense output between grid points.
    return sol.ys, sol.evaluate(jnp.array(1.2345)), sol.stats["num_steps"]


# 402 points: 401 intervals (not divisible by 4), with a coarse-grid level of 50.
SOLVERS = {
    "deer": dict(num_points=402),
    "quasi-deer": dict(num_points=402, method="quasi-deer"),
    "elk": dict(num_points=130, method="elk"),
    "quasi-elk": dict(num_points=130, method="quasi-elk"),  # (on `decay`)
    "tsit5": dict(num_points=130, discretisation=diffrax.Tsit5()),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_deer(name):
    # Quasi-ELK's diagonal linearisation does not converge on the pendulum.
    term = diffrax.ODETerm(decay) if name == "quasi-elk" else TERM
    run = lambda m: outputs(deer_solve(diffrax_deer.DEER(mesh=m, **SOLVERS[name]), term=term))
    ref, out = jax.jit(lambda: run(None))(), jax.jit(lambda: run(mesh()))()
    assert_same(out, ref)


def test_deer_adaptive_windows():
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)

    def run(m):
        solver = diffrax_deer.DEER(num_points=66, mesh=m)
        return outputs(deer_solve(solver, dt0=None, controller=controller))

    ref, out = jax.jit(lambda: run(None))(), jax.jit(lambda: run(mesh()))()
    assert int(ref[2]) > 2  # several windows, some rejected
    assert_same(out, ref)


@pytest.mark.parametrize(
    "discretisation", [None, diffrax.Tsit5()], ids=["exponential", "tsit5"]
)
def test_deer_gradients(discretisation):
    # Exponential scheme: reverse mode (RecursiveCheckpointAdjoint) with respect to the
    # parameters and the initial state, and forward mode; Tsit5's map: DirectAdjoint.
    def loss(m, args, y0, adjoint=None):
        solver = diffrax_deer.DEER(num_points=130, discretisation=discretisation, mesh=m)
        return jnp.sum(deer_solve(solver, args, y0, adjoint=adjoint).ys ** 2)

    def derivatives(m):
        if discretisation is not None:
            return jax.grad(loss, argnums=1)(m, ARGS, Y0, diffrax.DirectAdjoint())
        grad = jax.grad(loss, argnums=(1, 2))(m, ARGS, Y0)
        tangent = jax.jvp(
            lambda a: loss(m, a, Y0, diffrax.ForwardMode()), (ARGS,), ((1.0, -2.0),)
        )[1]
        return grad, tangent

    ref, out = jax.jit(lambda: derivatives(None))(), jax.jit(lambda: derivatives(mesh()))()
    assert_same(out, ref)


CELL_KEY = jax.random.PRNGKey(0)
CELLS = {
    "gru": eqx.nn.GRUCell(2, 4, key=CELL_KEY),
    "lstm": eqx.nn.LSTMCell(2, 3, key=CELL_KEY),
}
XS = jax.random.normal(jax.random.PRNGKey(1), (203, 2))


def rnn(cell):
    def step(h, x):
        h = cell(x, h)
        return h, jax.tree_util.tree_leaves(h)[0]

    zeros = jnp.zeros(cell.hidden_size)
    return step, (zeros if isinstance(cell, eqx.nn.GRUCell) else (zeros, zeros))


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("reverse", [False, True])
def test_scan(cell, reverse):
    step, h0 = rnn(CELLS[cell])
    for method in ("deer", "quasi-deer"):
        run = lambda m, method=method: jax.jit(
            lambda xs: diffrax_deer.scan(step, h0, xs, reverse=reverse, method=method, mesh=m)
        )(XS)
        out = run(mesh())
        assert_same(out, run(None))
        assert_same(out, jax.lax.scan(step, h0, XS, reverse=reverse), tol=1e-8)


def test_scan_gradients():
    cell = CELLS["gru"]

    def loss(cell, xs, m):
        step = lambda h, x: (cell(x, h), cell(x, h))
        final, ys = diffrax_deer.scan(step, jnp.zeros(4), xs, mesh=m)
        return jnp.sum(final) + jnp.sum(ys**2)

    def derivatives(m):
        grad = eqx.filter_grad(lambda c, xs: loss(c, xs, m))(cell, XS)
        tangent = jax.jvp(lambda xs: loss(cell, xs, m), (XS,), (jnp.ones_like(XS),))[1]
        return grad, tangent

    ref = eqx.filter_jit(lambda: derivatives(None))()
    out = eqx.filter_jit(lambda: derivatives(mesh()))()
    assert_same(out, ref)


def test_data_parallel_batch():
    # A batch sharded over "data" (vmap with spmd_axis_name), time over "time".
    grid = jax.make_mesh((2, 2), ("data", "time"))
    step, h0 = rnn(CELLS["gru"])
    xs = jnp.stack([XS[:200], 2 * XS[:200]])

    def run(xs):
        return diffrax_deer.scan(step, h0, xs, mesh=grid, axis_name="time")

    out = jax.jit(jax.vmap(run, spmd_axis_name="data"))(xs)
    ref = jax.vmap(lambda xs: jax.lax.scan(step, h0, xs))(xs)
    assert_same(out, ref)


def temp_bytes(fn, *args):
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_per_device():
    # The compiled program's temporaries on each device: about 1/P of one device's.
    def deer(m):
        solver = diffrax_deer.DEER(num_points=8193, mesh=m)
        sol = diffrax.diffeqsolve(TERM, solver, 0.0, 3.0, 3.0, Y0, args=ARGS)
        return sol.ys

    step, h0 = rnn(CELLS["gru"])
    xs = jnp.zeros((8192, 2))
    scan = lambda m: jax.jit(lambda xs: diffrax_deer.scan(step, h0, xs, mesh=m))
    ratios = [
        temp_bytes(jax.jit(lambda: deer(mesh()))) / temp_bytes(jax.jit(lambda: deer(None))),
        temp_bytes(scan(mesh()), xs) / temp_bytes(scan(None), xs),
    ]
    assert max(ratios) < 1.5 / P, ratios


def test_errors():
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        diffrax_deer.DEER(mesh="time")  # type: ignore
    with pytest.raises(ValueError, match="axis_name"):
        diffrax_deer.DEER(mesh=jax.make_mesh((2, 2), ("a", "b")))
    with pytest.raises(ValueError, match="not an axis"):
        diffrax_deer.DEER(mesh=mesh(), axis_name="space")
    with pytest.raises(ValueError, match="needs `mesh=`"):
        diffrax_deer.scan(lambda c, x: (c, x), jnp.zeros(1), XS, axis_name="time")
    # Inside `jax.set_mesh` of a mesh with explicit axes: a clear error.
    explicit = jax.make_mesh((P,), ("time",), axis_types=(AxisType.Explicit,))
    step = lambda c, x: (0.5 * c + x[:1], c)
    with jax.set_mesh(explicit), pytest.raises(ValueError, match="set_mesh"):
        diffrax_deer.scan(step, jnp.zeros(1), XS, mesh=explicit)
    # A mesh with one device along time: the single-device code.
    one = jax.make_mesh((1,), ("time",))
    assert_same(diffrax_deer.scan(step, jnp.zeros(1), XS, mesh=one), jax.lax.scan(step, jnp.zeros(1), XS))
