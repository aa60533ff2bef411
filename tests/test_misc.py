"""Shared helpers: `traced_once` traces a function once per call signature and stays
exact (static outputs, closed-over tracers, unhashable static arguments)."""

import jax
import jax.numpy as jnp
import numpy as np

from diffrax_deer._misc import traced_once


def test_traced_once_traces_once_and_is_exact():
    calls = []

    def f(x, scale, name):
        calls.append(name)
        return {"y": jnp.sin(x) * scale, "name": name}

    g = traced_once(f)

    @jax.jit
    def run(x):
        # As diffrax does with a solver's step: shapes first, then the real trace.
        jax.eval_shape(lambda x: g(x, 2.0, "a")["y"], x)
        jax.eval_shape(lambda x: g(x, 2.0, "a")["y"], x)
        out = g(x, 2.0, "a")
        assert out["name"] == "a"  # static outputs come back
        return out["y"] + g(x, 3.0, "b")["y"]

    x = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(run(x), 5 * jnp.sin(x), rtol=1e-14)
    assert calls == ["a", "b"]


def test_traced_once_closed_over_tracers_and_gradients():
    # A vector field closing over a traced parameter, traced twice under `grad`.
    calls = []

    def apply(x, fn):
        calls.append(1)
        return fn(x)

    def loss(w):
        g = traced_once(apply)
        fn = lambda x: jnp.sum(w * x**2)
        jax.eval_shape(lambda x: g(x, fn), jnp.ones(3))
        return g(jnp.arange(3.0), fn)

    w = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(w), jnp.arange(3.0) ** 2, rtol=1e-14)
    assert len(calls) == 1


def test_traced_once_unhashable_static_falls_back():
    calls = []

    def f(x, options):
        calls.append(1)
        return x * options[0]

    g = traced_once(f)
    options = (2.0, {"a set is not hashable"})
    y = jax.jit(lambda x: g(x, options) + g(x, options))(jnp.ones(2))
    np.testing.assert_allclose(y, jnp.full(2, 4.0))
    assert len(calls) == 2  # traced as plain `f`, each time
