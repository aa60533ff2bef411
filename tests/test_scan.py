"""`diffrax_deer.scan` against `jax.lax.scan`: values, PyTrees, `reverse`, `length`,
`vmap`/`jit`, gradients in both modes, quasi-DEER's memory, global convergence and the
error paths.

Kept fast: few distinct shapes and functions (each costs a compilation), everything
under `jit`.
"""

import functools as ft
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optimistix as optx
import pytest
from jax.extend import core as jex_core

import diffrax_deer
from diffrax_deer._scan import _resolve_root_finder, AUTO_DENSE_MAX_ENTRIES

from .helpers import tree_allclose


T, D, I = 64, 4, 3
# Tight Newton tolerance for quasi-DEER (linear convergence: its error is about the
# tolerance); DEER's last step squares the error, so its defaults already give ~1e-16.
TIGHT = dict(rtol=1e-12, atol=1e-12)
METHODS = ("deer", "quasi-deer")


def _keys(n, seed=0):
    return jr.split(jr.PRNGKey(seed), n)


class TanhRNN(eqx.Module):
    """h' = tanh(W h + U x + b), random weights."""

    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __init__(self, d, i, key, gain=1.0):
        k1, k2, k3 = jr.split(key, 3)
        self.W = gain * jr.normal(k1, (d, d)) / math.sqrt(d)
        self.U = jr.normal(k2, (d, i))
        self.b = 0.1 * jr.normal(k3, (d,))

    def __call__(self, x, h):
        return jnp.tanh(self.W @ h + self.U @ x + self.b)


def _cells():
    k = _keys(5)
    return {
        "gru": eqx.nn.GRUCell(I, D, key=k[0]),
        "lstm": eqx.nn.LSTMCell(I, D, key=k[1]),
        "tanh": TanhRNN(D, I, k[2]),
        "stacked": (TanhRNN(D, I, k[3]), eqx.nn.GRUCell(D, D + 1, key=k[4])),
    }


CELLS = _cells()


def _step(name):
    """A scan body `(carry, x) -> (carry, y)` for each cell, with its initial carry."""
    if name == "gru" or name == "tanh":

        def step(cell, h, x):
            h = cell(x, h)
            return h, h

        return step, jnp.zeros(D)
    if name == "lstm":

        def step(cell, carry, x):
            h, c = cell(x, carry)
            return (h, c), {"h": h, "c_norm": jnp.sum(c**2)}

        return step, (jnp.zeros(D), jnp.zeros(D))
    if name == "stacked":

        def step(cells, carry, x):
            h1, h2 = carry
            h1 = cells[0](x, h1)
            h2 = cells[1](h1, h2)
            return (h1, h2), h2

        return step, (jnp.zeros(D), 0.1 * jnp.ones(D + 1))
    raise ValueError(name)


XS = jr.normal(jr.PRNGKey(1), (T, I))


@eqx.filter_jit
def _run(name, cell, init, xs, method, kwargs):
    step, _ = _step(name)
    f = lambda c, x: step(cell, c, x)
    if method == "lax":
        return jax.lax.scan(f, init, xs)
    return diffrax_deer.scan(f, init, xs, method=method, return_stats=True, **kwargs)


def _check(out, ref, rtol=1e-10, atol=1e-10):
    final, ys, stats = out
    assert stats.result == optx.RESULTS.successful
    assert tree_allclose((final, ys), ref, rtol=rtol, atol=atol)
    return stats


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("method", METHODS)
def test_matches_lax_scan(name, method):
    cell = CELLS[name]
    _, init = _step(name)
    kwargs = TIGHT if method == "quasi-deer" else {}
    ref = _run(name, cell, init, XS, "lax", {})
    stats = _check(_run(name, cell, init, XS, method, kwargs), ref)
    assert 1 <= int(stats.num_iters) <= (8 if method == "deer" else 40)


def test_float32():
    k = _keys(2, seed=3)
    cell = eqx.nn.GRUCell(I, D, dtype=jnp.float32, key=k[0])
    xs = jr.normal(k[1], (T, I), jnp.float32)
    init = jnp.zeros(D, jnp.float32)
    ref = _run("gru", cell, init, xs, "lax", {})
    for method in METHODS:
        final, ys, stats = _run("gru", cell, init, xs, method, {})
        assert ys.dtype == final.dtype == jnp.float32
        assert stats.result == optx.RESULTS.successful
        assert tree_allclose((final, ys), ref, rtol=1e-5, atol=1e-5)


@ft.partial(jax.jit, static_argnums=0)
def _batched_gru(method, h0, xs):
    cell = CELLS["gru"]

    def one(h, x):
        f = lambda h, x: (cell(x, h), cell(x, h)[:2])
        if method == "lax":
            return jax.lax.scan(f, h, x)
        kwargs = TIGHT if method == "quasi-deer" else {}
        return diffrax_deer.scan(f, h, x, method=method, **kwargs)

    return jax.vmap(one)(h0, xs)


@pytest.mark.parametrize("method", METHODS)
def test_long_sequence_vmap_jit(method):
    # T = 1e4, a batch of 2 sequences under vmap, inside jit.
    length, batch = 10_000, 2
    xs = jr.normal(jr.PRNGKey(4), (batch, length, I))
    h0 = 0.1 * jr.normal(jr.PRNGKey(5), (batch, D))
    out = _batched_gru(method, h0, xs)
    ref = _batched_gru("lax", h0, xs)
    assert out[1].shape == (batch, length, 2)
    assert tree_allclose(out, ref, rtol=1e-10, atol=1e-10)


def _pytree_step(carry, x):
    h, s = carry
    h = jnp.tanh(0.9 * jnp.roll(h, 1) + x["a"] * s + 0.3)
    s = 0.5 * s + jnp.sum(h) * x["b"]
    return (h, s), (s, {"h2": h**2})


def test_reverse_pytrees_and_guess():
    xs = {"a": jr.normal(jr.PRNGKey(6), (T, 2)), "b": jr.normal(jr.PRNGKey(7), (T,))}
    init = (jnp.ones(2), jnp.array(0.5))

    @jax.jit
    def run(xs, init):
        out = {}
        for reverse in (False, True):
            ref = jax.lax.scan(_pytree_step, init, xs, reverse=reverse)
            new = diffrax_deer.scan(_pytree_step, init, xs, reverse=reverse)
            # Warm start from the exact carries (guess[k]: the carry after xs[k]).
            carries = jax.lax.scan(
                lambda c, x: (_pytree_step(c, x)[0],) * 2, init, xs, reverse=reverse
            )[1]
            warm = diffrax_deer.scan(
                _pytree_step, init, xs, reverse=reverse, guess=carries,
                return_stats=True,
            )
            out[reverse] = ref, new, warm
        return out

    for ref, new, warm in run(xs, init).values():
        assert jtu.tree_structure(new) == jtu.tree_structure(ref)
        assert tree_allclose(new, ref, rtol=1e-10, atol=1e-10)
        assert tree_allclose(warm[:2], ref, rtol=1e-10, atol=1e-10)
        assert int(warm[2].num_iters) == 1


def test_length_without_xs():
    def f(c, _):
        c = jnp.tanh(jnp.stack([1.2 * c[1], -0.8 * c[0]]) + 0.3)
        return c, jnp.sum(c)

    @jax.jit
    def run(init):
        return (
            jax.lax.scan(f, init, length=30),
            diffrax_deer.scan(f, init, length=30),
            jax.lax.scan(f, init, length=30, reverse=True),
            diffrax_deer.scan(f, init, length=30, reverse=True),
        )

    ref, new, ref_reverse, new_reverse = run(jnp.array([1.0, -2.0]))
    assert tree_allclose(new, ref, rtol=1e-10, atol=1e-10)
    assert tree_allclose(new_reverse, ref_reverse, rtol=1e-10, atol=1e-10)


def test_sequential_no_carry_and_empty():
    cell = CELLS["gru"]
    f = lambda h, x: (cell(x, h), 2 * h)
    h0 = jnp.zeros(D)
    ref = jax.lax.scan(f, h0, XS, reverse=True)
    final, ys, stats = diffrax_deer.scan(
        f, h0, XS, reverse=True, method="sequential", return_stats=True
    )
    assert tree_allclose((final, ys), ref, rtol=0, atol=0)
    assert int(stats.num_iters) == 0 and stats.result == optx.RESULTS.successful
    # No carry: a map.
    g = lambda c, x: (c, jnp.sin(x))
    assert tree_allclose(diffrax_deer.scan(g, (), XS), jax.lax.scan(g, (), XS))
    # Empty sequence.
    empty = jnp.zeros((0, I))
    assert tree_allclose(diffrax_deer.scan(f, h0, empty), jax.lax.scan(f, h0, empty))


def _grad_inputs():
    cell = CELLS["gru"]
    xs = XS[:40]
    h0 = 0.1 * jnp.arange(D, dtype=xs.dtype)
    return cell, h0, xs


def _loss(method, cell, h0, xs):
    def f(h, x):
        h = cell(x, h)
        return h, jnp.sin(h)

    if method == "lax":
        final, ys = jax.lax.scan(f, h0, xs)
    else:
        final, ys = diffrax_deer.scan(f, h0, xs, method=method, **TIGHT)
    return jnp.sum(final**2) + jnp.sum(ys * jnp.cos(jnp.arange(ys.shape[0]))[:, None])


def _tangents(tree, seed):
    leaves, treedef = jtu.tree_flatten(tree)
    keys = _keys(len(leaves), seed)
    return jtu.tree_unflatten(
        treedef, [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_lax_scan(method):
    cell, h0, xs = _grad_inputs()
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    primals = (params, h0, xs)

    def loss(method, primals):
        params, h0, xs = primals
        return _loss(method, eqx.combine(params, static), h0, xs)

    @jax.jit
    def derivatives(primals, tangents):
        out = {}
        for m in ("lax", method):
            grad = jax.grad(lambda p: loss(m, p))(primals)
            _, jvp = jax.jvp(lambda p: loss(m, p), (primals,), (tangents,))
            out[m] = grad, jvp
        return out

    out = derivatives(primals, _tangents(primals, seed=8))
    (grad_ref, jvp_ref), (grad, jvp) = out["lax"], out[method]
    assert tree_allclose(grad, grad_ref, rtol=1e-8, atol=1e-10)
    assert jnp.allclose(jvp, jvp_ref, rtol=1e-8, atol=1e-10)
    # Every input actually matters.
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jtu.tree_leaves(grad_ref))


def _largest_array(closed_jaxpr) -> int:
    """Number of elements of the largest array anywhere in a jaxpr (sub-jaxprs of
    loops, custom derivatives, ... included)."""
    largest = 0

    def visit(jaxpr):
        nonlocal largest
        for var in [*jaxpr.invars, *jaxpr.constvars, *jaxpr.outvars]:
            largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
            for sub in jex_core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(closed_jaxpr.jaxpr)
    return largest


def test_quasi_deer_never_builds_TDD():
    # D = 8, T = 64: a (T, D, D) array has 4096 elements, more than any O(T D)
    # intermediate of the GRU (the gates: T * 3D = 1536).
    d = 8
    cell = eqx.nn.GRUCell(2, d, key=jr.PRNGKey(9))
    xs = jnp.ones((T, 2))
    h0 = jnp.zeros(d)

    def loss(method, cell, h0, xs):
        f = lambda h, x: (cell(x, h), cell(x, h))
        final, ys = diffrax_deer.scan(f, h0, xs, method=method)
        return jnp.sum(ys) + jnp.sum(final)

    for method, mode in [("deer", "forward"), ("quasi-deer", "forward"), ("quasi-deer", "grad")]:
        fn = ft.partial(loss, method)
        if mode == "grad":
            fn = eqx.filter_grad(fn)
        largest = _largest_array(jax.make_jaxpr(fn)(cell, h0, xs))
        if method == "deer":
            assert largest >= T * d * d  # the check does see dense Jacobians
        else:
            assert largest < T * d * d, (mode, largest)


def test_auto_method():
    def method(name, T, D, has_diagonal):
        return _resolve_root_finder(name, None, {}, T, D, has_diagonal).method

    assert method("auto", 1000, 8, False) == "deer"
    assert method("auto", AUTO_DENSE_MAX_ENTRIES // 64 + 1, 8, False) == "quasi-deer"
    assert method("auto", 10, 8, True) == "quasi-deer"
    assert method("deer", 10**9, 8, False) == "deer"
    assert method("quasi-elk", 10, 8, False) == "quasi-elk"


def _expansive(c, x):
    # Strongly expansive, coupled (|dF/dc| ~ 2.5-5.5): errors grow ~4x per step.
    c = 2.5 * c + jnp.sin(3 * c[::-1]) + x
    return c, c


def _logistic(c, x):
    # Chaotic coupled logistic maps.
    c = 3.9 * c * (1 - c) + 0.02 * (c[::-1] - c) + 0 * x
    return c, c


@pytest.mark.parametrize("fn", [_expansive, _logistic])
def test_converges_within_T_iterations_from_any_guess(fn):
    # After i iterations the first i carries are exact: a T-step recurrence converges
    # in at most T iterations from any guess, even one whose first iterates overflow
    # (reset to the previous iterate); here max_iters = T.
    length = 20
    xs = 0.1 * jr.normal(jr.PRNGKey(10), (length, 2))
    init = jnp.array([0.3, 0.6])
    guess = 1e200 * jr.normal(jr.PRNGKey(11), (length, 2))

    @jax.jit
    def run(init, xs, guess):
        ref = jax.lax.scan(fn, init, xs)
        out = {
            m: diffrax_deer.scan(
                fn, init, xs, method=m, max_iters=length, guess=guess, return_stats=True
            )
            for m in METHODS
        }
        return ref, out

    ref, out = run(init, xs, guess)
    for final, ys, stats in out.values():
        assert stats.result == optx.RESULTS.successful
        assert int(stats.num_iters) <= length
        # Chaos amplifies round-off for lax.scan and DEER alike.
        assert tree_allclose((final, ys), ref, rtol=1e-8, atol=1e-8)


def test_user_jacobian_diagonal():
    cell = CELLS["tanh"]
    f = lambda h, x: (cell(x, h), h)

    def diagonal(h, x):
        return (1 - cell(x, h) ** 2) * jnp.diagonal(cell.W)

    @jax.jit
    def run(h0, xs):
        return (
            jax.lax.scan(f, h0, xs),
            diffrax_deer.scan(f, h0, xs, jacobian_diagonal=diagonal, return_stats=True, **TIGHT),
            diffrax_deer.scan(f, h0, xs, method="quasi-deer", return_stats=True, **TIGHT),
        )

    ref, (*user, user_stats), (*auto, auto_stats) = run(jnp.zeros(D), XS)
    assert tree_allclose(tuple(user), ref, rtol=1e-10, atol=1e-10)
    assert int(user_stats.num_iters) == int(auto_stats.num_iters)



@pytest.mark.parametrize("use_bias", [True, False])
def test_cell_jacobian_diagonals(use_bias):
    # The closed forms against autodiff's Jacobian diagonal, at random states (GRU and
    # LSTM, with and without biases); then a quasi-DEER LSTM scan given its diagonal
    # against lax.scan, in the same number of iterations as without it.
    kg, kl, kh, kc = jax.random.split(jax.random.PRNGKey(5), 4)
    gru = eqx.nn.GRUCell(3, D, use_bias=use_bias, key=kg)
    lstm = eqx.nn.LSTMCell(3, D, use_bias=use_bias, key=kl)
    h, c, x = jax.random.normal(kh, (D,)), jax.random.normal(kc, (D,)), XS[0]
    exact = jnp.diagonal(jax.jacfwd(lambda h: gru(x, h))(h))
    assert tree_allclose(diffrax_deer.gru_jacobian_diagonal(gru)(h, x), exact, rtol=1e-12, atol=1e-12)
    flat = lambda hc: jnp.concatenate(lstm(x, (hc[:D], hc[D:])))
    exact = jnp.diagonal(jax.jacfwd(flat)(jnp.concatenate([h, c])))
    got = diffrax_deer.lstm_jacobian_diagonal(lstm)((h, c), x)
    assert tree_allclose(jnp.concatenate(got), exact, rtol=1e-12, atol=1e-12)

    step = lambda hc, x: (lstm(x, hc), hc[0])
    init = (jnp.zeros(D), jnp.zeros(D))

    @jax.jit
    def run(xs):
        diag = diffrax_deer.lstm_jacobian_diagonal(lstm)
        return (
            jax.lax.scan(step, init, xs),
            diffrax_deer.scan(step, init, xs, jacobian_diagonal=diag, return_stats=True, **TIGHT),
            diffrax_deer.scan(step, init, xs, method="quasi-deer", return_stats=True, **TIGHT),
        )

    ref, (*user, user_stats), (*auto, auto_stats) = run(XS)
    assert tree_allclose(tuple(user), ref, rtol=1e-10, atol=1e-10)
    assert int(user_stats.num_iters) == int(auto_stats.num_iters)
    with pytest.raises(TypeError, match="GRUCell"):
        diffrax_deer.gru_jacobian_diagonal(lstm)


def test_errors():
    f = lambda c, x: (c + x, c)
    xs = jnp.ones((5, 2))
    with pytest.raises(TypeError, match="floating-point carry"):
        diffrax_deer.scan(f, jnp.zeros(2, jnp.int32), xs.astype(jnp.int32))
    # ... which `method="sequential"` accepts, like `jax.lax.scan`.
    diffrax_deer.scan(f, jnp.zeros(2, jnp.int32), xs.astype(jnp.int32), method="sequential")
    with pytest.raises(TypeError, match="carry"):
        diffrax_deer.scan(lambda c, x: ((c, c), x), jnp.zeros(2), xs)
    with pytest.raises(TypeError, match="carry"):
        diffrax_deer.scan(lambda c, x: (c[:1], x), jnp.zeros(2), xs)
    with pytest.raises(ValueError, match="method"):
        diffrax_deer.scan(f, jnp.zeros(2), xs, method="newton")
    with pytest.raises(ValueError, match="max_iters"):
        diffrax_deer.scan(f, jnp.zeros(2), xs, max_iters=0)
    with pytest.raises(ValueError, match="jacobian_diagonal"):
        diffrax_deer.scan(f, jnp.zeros(2), xs, method="deer", jacobian_diagonal=f)
    with pytest.raises(ValueError, match="guess"):
        diffrax_deer.scan(f, jnp.zeros(2), xs, guess=jnp.zeros((4, 2)))


def test_non_convergence():
    cell = CELLS["gru"]
    f = lambda h, x: (cell(x, h), h)

    @eqx.filter_jit
    def run(h0, xs, throw, fallback):
        finder = diffrax_deer.ParallelNewton(sequential_fallback=fallback)
        return diffrax_deer.scan(
            f, h0, xs, root_finder=finder, max_iters=2, throw=throw, return_stats=True
        )

    # By default the rest of the sequence is evaluated sequentially: exact.
    final, ys, stats = run(jnp.zeros(D), XS, True, True)
    ref_final, ref_ys = jax.lax.scan(f, jnp.zeros(D), XS)
    assert tree_allclose((final, ys), (ref_final, ref_ys), rtol=1e-12, atol=1e-12)
    assert stats.result == optx.RESULTS.successful
    assert int(stats.num_iters) == 2 and 0 < int(stats.num_sequential) < XS.shape[0]
    # Without the fallback: a clear failure.
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(run(jnp.zeros(D), XS, True, False))
    final, ys, stats = run(jnp.zeros(D), XS, False, False)
    assert stats.result == optx.RESULTS.nonlinear_max_steps_reached
    assert int(stats.num_iters) == 2 and float(stats.update_norm) > 1
    assert int(stats.num_sequential) == 0
    assert bool(jnp.all(jnp.isfinite(ys)))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_shared_parameters_batched_sequences(method):
    # The usual training setup: one cell, a vmapped batch of sequences, the gradient
    # with respect to the shared weights (and, in forward mode, a direction in them).
    # Each linear primitive of the derivative then sees unbatched tangents against
    # batched residuals; the cotangent must be summed over the batch.
    cell, h0, xs = _grad_inputs()
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    xs_batch = jnp.stack([xs, jnp.cos(xs), xs[::-1]])
    h0_batch = jnp.stack([h0, -h0, 2 * h0])

    def loss(m, params):
        batched = jax.vmap(lambda h0, xs: _loss(m, eqx.combine(params, static), h0, xs))
        return jnp.sum(batched(h0_batch, xs_batch))

    @jax.jit
    def derivatives(params, tangent):
        out = {}
        for m in ("lax", method):
            _, jvp = jax.jvp(lambda p: loss(m, p), (params,), (tangent,))
            out[m] = jax.grad(lambda p: loss(m, p))(params), jvp
        return out

    out = derivatives(params, _tangents(params, seed=9))
    (grad_ref, jvp_ref), (grad, jvp) = out["lax"], out[method]
    assert tree_allclose(grad, grad_ref, rtol=1e-8, atol=1e-10)
    assert jnp.allclose(jvp, jvp_ref, rtol=1e-8, atol=1e-10)
