"""Gradients through `diffeqsolve(..., DEER())` against central finite differences of
the same solver: the implicit-function-theorem derivatives are those of the discrete
solution, so they agree to the accuracy of finite differences."""

import functools as ft

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffrax_deer import DEER


_MLP = eqx.nn.MLP(2, 2, width_size=8, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
_Y0 = jnp.array([0.8, -0.4])
_T0, _T1 = 0.1, 1.7
_TS = jnp.array([0.5, 1.0, 1.5])


def _vector_field(t, y, mlp):
    return mlp(y) - 0.3 * y + 0.1 * jnp.sin(t)


def _loss(mlp, y0, t0, t1, *, adjoint, method="deer"):
    # Two windows, values read off dense interpolation inside them and at t1.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vector_field), DEER(num_points=41, method=method, rtol=1e-11, atol=1e-11),
        t0, t1, (t1 - t0) / 2, y0, args=mlp,
        saveat=diffrax.SaveAt(ts=_TS, t1=True), adjoint=adjoint,
    )
    return jnp.sum(sol.ys[:-1] ** 2) + jnp.sum(jnp.sin(sol.ys[-1]))


def _directions():
    params, _ = eqx.partition(_MLP, eqx.is_inexact_array)
    keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree_util.tree_leaves(params)))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    v_params = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    return v_params, jnp.array([0.3, -0.7]), 0.6, -0.9


@ft.cache
def _finite_difference(method):
    """Directional derivative of the loss along each input separately."""
    v_params, v_y0, v_t0, v_t1 = _directions()
    loss = eqx.filter_jit(ft.partial(_loss, adjoint=diffrax.RecursiveCheckpointAdjoint(), method=method))
    eps = 1e-5

    def central(f):
        return (f(eps) - f(-eps)) / (2 * eps)

    def shift_params(e):
        return eqx.apply_updates(_MLP, jax.tree_util.tree_map(lambda v: e * v, v_params))

    return (
        central(lambda e: loss(shift_params(e), _Y0, _T0, _T1)),
        central(lambda e: loss(_MLP, _Y0 + e * v_y0, _T0, _T1)),
        central(lambda e: loss(_MLP, _Y0, _T0 + e * v_t0, _T1)),
        central(lambda e: loss(_MLP, _Y0, _T0, _T1 + e * v_t1)),
    )


def _reverse(adjoint, method):
    v_params, v_y0, v_t0, v_t1 = _directions()

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(inputs):
        mlp, y0, t0, t1 = inputs
        return _loss(mlp, y0, t0, t1, adjoint=adjoint, method=method)

    g_mlp, g_y0, g_t0, g_t1 = grads((_MLP, _Y0, jnp.asarray(_T0), jnp.asarray(_T1)))
    dot = sum(
        jnp.sum(a * b)
        for a, b in zip(
            jax.tree_util.tree_leaves(eqx.filter(g_mlp, eqx.is_inexact_array)),
            jax.tree_util.tree_leaves(v_params),
        )
    )
    return dot, jnp.dot(g_y0, v_y0), g_t0 * v_t0, g_t1 * v_t1


def _forward(adjoint, method):
    v_params, v_y0, v_t0, v_t1 = _directions()
    params, static = eqx.partition(_MLP, eqx.is_inexact_array)

    @jax.jit
    def jvp(tp, ty0, tt0, tt1):
        f = lambda p, y0, t0, t1: _loss(eqx.combine(p, static), y0, t0, t1, adjoint=adjoint, method=method)
        return jax.jvp(f, (params, _Y0, _T0, _T1), (tp, ty0, tt0, tt1))[1]

    zp = jax.tree_util.tree_map(jnp.zeros_like, v_params)
    z2 = jnp.zeros(2)
    return (
        jvp(v_params, z2, 0.0, 0.0),
        jvp(zp, v_y0, 0.0, 0.0),
        jvp(zp, z2, v_t0, 0.0),
        jvp(zp, z2, 0.0, v_t1),
    )


@pytest.mark.parametrize(
    "mode,adjoint",
    [
        ("reverse", diffrax.RecursiveCheckpointAdjoint()),
        ("reverse", diffrax.DirectAdjoint()),
        ("forward", diffrax.DirectAdjoint()),
        ("forward", diffrax.ForwardMode()),
    ],
    ids=["grad-checkpoint", "grad-direct", "jvp-direct", "jvp-forwardmode"],
)
def test_gradients_match_finite_differences(mode, adjoint):
    fd = _finite_difference("deer")
    got = (_reverse if mode == "reverse" else _forward)(adjoint, "deer")
    for name, a, b in zip(["args", "y0", "t0", "t1"], got, fd):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=name)


def test_quasi_deer_gradients_exact():
    # The diagonal (quasi-DEER) scheme has its own discrete solution; its gradients are
    # exact too (the backward solve refines the diagonal preconditioner with exact
    # Jacobian-vector products).
    fd = _finite_difference("quasi-deer")
    got = _reverse(diffrax.RecursiveCheckpointAdjoint(), "quasi-deer")
    for name, a, b in zip(["args", "y0", "t0", "t1"], got, fd):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=name)


def test_gradient_memory_independent_of_iterations():
    # The backward pass stores nothing per Newton iteration: the compiled gradient's
    # temporary memory is the same whether the solve is allowed 5 or 500 iterations
    # (the while loop is never differentiated).
    def compiled_bytes(max_iters):
        def loss(y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(_vector_field), DEER(num_points=51, max_iters=max_iters),
                0.0, 1.0, 1.0, y0, args=_MLP, saveat=diffrax.SaveAt(t1=True),
            )
            return jnp.sum(sol.ys)

        lowered = jax.jit(jax.grad(loss)).lower(_Y0).compile()
        analysis = lowered.memory_analysis()
        return None if analysis is None else analysis.temp_size_in_bytes

    a, b = compiled_bytes(5), compiled_bytes(500)
    if a is None:
        pytest.skip("memory analysis unavailable on this backend")
    assert a == b


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_refinement_tolerance_follows_dtype(dtype):
    # The implicit derivative's refinement stops at the forward solve's own (Newton)
    # tolerance, never below eps^0.75 of the dtype: reachable in float32 too, where
    # the float64 floor (1e-12) would never be met.
    from diffrax_deer._implicit import refinement_tolerance
    from diffrax_deer._misc import default_tolerance

    eps = float(jnp.finfo(dtype).eps)
    default = default_tolerance(dtype)
    assert refinement_tolerance(dtype, default) == max(default, eps**0.75)
    assert refinement_tolerance(dtype, 1e-30) == max(eps**0.75, 1e-12)
    assert refinement_tolerance(jnp.float32, 1e-8) > 1e-6 > refinement_tolerance(jnp.float64, 1e-8)

    # And a gradient that needs the refinement (exponential scheme, default
    # tolerances) converges in this dtype and agrees with float64's.
    def loss(args, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: -a * y + jnp.sin(y[::-1])), DEER(num_points=65),
            jnp.asarray(0.0, y0.dtype), jnp.asarray(2.0, y0.dtype), 1.0, y0, args=args,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.5, 2.0, 4).astype(y0.dtype)),
        )
        return jnp.sum(sol.ys**2)

    args, y0 = jnp.array([0.7, 1.3]), jnp.array([1.0, -0.5])
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    got = grad(args.astype(dtype), y0.astype(dtype))
    ref = grad(args, y0)
    tol = 1e-4 if dtype == jnp.float32 else 1e-8
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk", [5, 10**9])
def test_jacobian_derivatives_match_jax(monkeypatch, chunk):
    # The dense Jacobian's own derivatives (second order: the exponential scheme's
    # gradients) against JAX's differentiation of `vmap(jacfwd(f))`, with respect to
    # the parameters, the points and the states at once; `chunk = 5` takes the path
    # that evaluates them in chunks of points (used on CPU for long grids), with a
    # padded last chunk (23 points).
    import diffrax_deer._jacobian as jacobian

    monkeypatch.setattr(jacobian, "_CHUNK", chunk)
    fn = lambda mlp, t, y: _vector_field(t, y, mlp) * (1 + 0.3 * t * y[::-1])
    ts = jnp.linspace(0.0, 1.0, 23)
    ys = jax.random.normal(jax.random.PRNGKey(2), (23, 2))
    ours = lambda mlp, ts, ys: jacobian.value_and_jacobian(eqx.Partial(fn, mlp), ts, ys)
    ref = lambda mlp, ts, ys: jax.vmap(
        lambda t, y: (fn(mlp, t, y), jax.jacfwd(ft.partial(fn, mlp, t))(y))
    )(ts, ys)
    primals = (_MLP, ts, ys)
    v_params = _directions()[0]
    tangents = (v_params, jnp.cos(3 * ts), jnp.sin(ys))
    cts = (jnp.cos(ys), jax.random.normal(jax.random.PRNGKey(3), (23, 2, 2)))
    for a, b in zip(
        eqx.filter_jit(lambda p, t: eqx.filter_jvp(ours, p, t)[1])(primals, tangents),
        eqx.filter_jit(lambda p, t: eqx.filter_jvp(ref, p, t)[1])(primals, tangents),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    got = eqx.filter_jit(lambda p, c: eqx.filter_vjp(ours, *p)[1](c))(primals, cts)
    want = eqx.filter_jit(lambda p, c: eqx.filter_vjp(ref, *p)[1](c))(primals, cts)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_lagged_refinement_matches_dense_solve(monkeypatch):
    # The exponential scheme's reverse-mode implicit derivative with one full backward
    # pass and a first-order correction (`_implicit._first_order_correction`) against the dense
    # -R^T L^{-T} ybar, and the same with the correction turned off (full steps).
    from diffrax_deer._discretisation import ExponentialScheme
    from diffrax_deer._implicit import _transpose
    from diffrax_deer._initial_guess import coarse_grid_guess
    from diffrax_deer._misc import TreeFlattener
    from diffrax_deer._root_finder import ParallelNewton, solve_trajectory

    from .helpers import van_der_pol

    y0 = jnp.array([2.0, 0.0])
    problem = ExponentialScheme(
        terms=diffrax.ODETerm(van_der_pol), args=jnp.array(1.0), t0=jnp.array(0.0),
        t1=jnp.array(1.0), y0=y0, flattener=TreeFlattener(y0), num_points=161,
        jacobian="dense",
    )
    finder = ParallelNewton(rtol=1e-12, atol=1e-12)
    guess, _ = coarse_grid_guess(problem, finder, 50)
    ys, _ = solve_trajectory(problem, guess, finder, 50)
    ct = jnp.cos(jnp.arange(ys.size, dtype=float)).reshape(ys.shape)
    T, D = ys.shape
    L = jax.jacfwd(problem.residual)(ys).reshape(T * D, T * D)
    lam = jnp.linalg.solve(L.T, ct.reshape(-1)).reshape(T, D)
    _, vjp = eqx.filter_vjp(lambda p: p.residual(ys), problem)
    expected = -vjp(lam)[0].args

    def run():
        transpose = eqx.filter_jit(lambda p: _transpose(ys, jnp.array(True), p, ct, 1e-8, T + 1))
        g, num_steps = transpose(problem)
        return g.args, int(num_steps)

    lagged, lagged_steps = run()
    monkeypatch.setattr(ExponentialScheme, "first_order_residual", lambda self, about: None)
    full, full_steps = run()
    assert (lagged_steps, full_steps) == (1, 2)  # the correction was needed and taken
    np.testing.assert_allclose(lagged, expected, rtol=1e-9)
    np.testing.assert_allclose(full, expected, rtol=1e-9)
