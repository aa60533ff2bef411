"""`DEER` dropped into ordinary diffrax training code: whole-interval windows whose end
rounds, vector fields closing over traced arrays, parameters outside the ODE, gradients
through adaptive windows that were rejected (also for failed Newton solves), and error
estimates for every window size, initial guess and method."""

import functools as ft

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffrax_deer import DEER

from .helpers import lotka_volterra, reference_solution, van_der_pol


def _decay(t, y, args):
    return -args * y + 0.3 * jnp.sin(t)


# --------------------------------------------------------------------------------------
# dt0 = t1 - t0 whose end rounds: diffrax adds a window about one ulp long.
# --------------------------------------------------------------------------------------


def _random_intervals(dtype, n_rounding=24, n_exact=8):
    """Random intervals [t0, t1], most of them such that t0 + (t1 - t0) rounds below
    t1 (a few percent of random intervals)."""
    rng = np.random.default_rng(0)
    t0 = rng.uniform(0.01, 3.0, 4000).astype(dtype)
    t1 = rng.uniform(3.1, 7.0, 4000).astype(dtype)
    rounds = t0 + (t1 - t0) < t1
    pick = np.concatenate([np.flatnonzero(rounds)[:n_rounding], np.flatnonzero(~rounds)[:n_exact]])
    return jnp.asarray(t0[pick]), jnp.asarray(t1[pick])


@ft.partial(jax.jit, static_argnames="exact")
def _whole_interval(t0, t1, y0, a, exact):
    # `exact`: one window [t0, t1] by `StepTo`; else diffrax's own stepping with
    # dt0 = t1 - t0 (a second, ~1 ulp window where t0 + (t1 - t0) < t1).
    controller = diffrax.StepTo(ts=jnp.stack([t0, t1])) if exact else diffrax.ConstantStepSize()
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_decay), DEER(num_points=17), t0, t1, None if exact else t1 - t0,
        y0, args=a, saveat=diffrax.SaveAt(ts=jnp.stack([t0, t0 + (t1 - t0) / 2, t1])),
        stepsize_controller=controller,
    )
    return sol.ys


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_whole_interval_window_whose_end_rounds(dtype):
    t0, t1 = _random_intervals(dtype)
    if dtype == jnp.float64:  # the case of the issue report
        t0 = jnp.append(t0, 0.2453091305078694)
        t1 = jnp.append(t1, 2.420996446355661)
    rounds = np.asarray(t0 + (t1 - t0) < t1)
    assert rounds.sum() >= 20  # the case under test occurs among these intervals
    y0 = jnp.array([1.0, -0.5], dtype)
    a = jnp.asarray(0.7, dtype)

    def run(exact):
        def loss(a, t0, t1):
            ys = _whole_interval(t0, t1, y0, a, exact)
            return jnp.sum(ys), ys

        grads, ys = jax.vmap(jax.grad(loss, has_aux=True), (None, 0, 0))(a, t0, t1)
        return ys, grads

    ys, grads = run(exact=False)
    ys_ref, grads_ref = run(exact=True)
    assert bool(jnp.all(jnp.isfinite(ys))) and bool(jnp.all(jnp.isfinite(grads)))
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(ys, ys_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(grads, grads_ref, rtol=tol, atol=tol)


def test_zero_length_window_interpolates():
    # A window of zero length (all grid times equal) evaluates to its start, with the
    # vector field as derivative.
    solver, terms, y0 = DEER(num_points=9), diffrax.ODETerm(_decay), jnp.array([1.0])
    t = jnp.array(1.0)
    state = solver.init(terms, t, t, y0, 0.5)
    y1, y_error, dense_info, _, result = solver.step(terms, t, t, y0, 0.5, state, False)
    assert result == diffrax.RESULTS.successful
    interp = solver.interpolation_cls(t0=t, t1=t, **dense_info)
    np.testing.assert_allclose(y1, y0)
    np.testing.assert_allclose(y_error, 0.0)
    np.testing.assert_allclose(interp.evaluate(t), y0)
    np.testing.assert_allclose(interp.derivative(t), _decay(t, y0, 0.5), rtol=1e-12)


# --------------------------------------------------------------------------------------
# Vector fields closing over traced arrays; parameters outside the ODE.
# --------------------------------------------------------------------------------------

_Y0 = jnp.array([1.0, -0.5])


def _closure_loss(a, c, adjoint=diffrax.RecursiveCheckpointAdjoint()):
    vf = lambda t, y, args: -args * y + c  # c closed over, a through args
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), DEER(num_points=33), 0.0, 1.0, 1.0, _Y0, args=a,
        saveat=diffrax.SaveAt(ts=jnp.array([0.5, 1.0])), adjoint=adjoint,
    )
    return jnp.sum(sol.ys**2)


def _args_loss(a, c):
    vf = lambda t, y, args: -args[0] * y + args[1]
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), DEER(num_points=33), 0.0, 1.0, 1.0, _Y0, args=(a, c),
        saveat=diffrax.SaveAt(ts=jnp.array([0.5, 1.0])),
    )
    return jnp.sum(sol.ys**2)


def test_closure_over_traced_array_gradients():
    a, c = jnp.array(1.3), jnp.array([0.3, -0.2])
    grad = jax.jit(jax.grad(_closure_loss, argnums=(0, 1)))(a, c)
    through_args = jax.jit(jax.grad(_args_loss, argnums=(0, 1)))
    grad_args = through_args(a, c)
    np.testing.assert_allclose(grad[0], grad_args[0], rtol=1e-10)
    np.testing.assert_allclose(grad[1], grad_args[1], rtol=1e-10)
    # (Gradients through `args` are checked against finite differences in
    # `test_gradients.py`; here they are the reference.)
    e = jnp.array([0.0, 1.0])
    # Under vmap over the closed-over array, and in forward mode.
    cs = jnp.stack([c, 2 * c, -c])
    grads = jax.vmap(jax.grad(_closure_loss), (None, 0))(a, cs)
    expected = jnp.stack([through_args(a, ci)[0] for ci in cs])
    np.testing.assert_allclose(grads, expected, rtol=1e-10)
    forward = lambda a, c: _closure_loss(a, c, diffrax.ForwardMode())
    jvp = jax.jit(lambda a, c: jax.jvp(forward, (a, c), (1.0, e))[1])(a, c)
    np.testing.assert_allclose(jvp, grad[0] + grad[1][1], rtol=1e-8)


def test_parameters_outside_the_ode():
    # q scales the loss and travels in `args` without entering the vector field (as the
    # noise covariances of a Kalman filter do); a enters the ODE.
    def loss(q, a, adjoint=diffrax.RecursiveCheckpointAdjoint()):
        vf = lambda t, y, args: -args[0] * y
        ys = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), DEER(num_points=33), 0.0, 1.0, 1.0, _Y0, args=(a, q),
            adjoint=adjoint,
        ).ys
        return q * jnp.sum(ys)

    q, a = 1.3, 2.0
    exact_ys = _Y0 * np.exp(-a)
    # Only q differentiated: the Newton solve's tangent is a symbolic zero.
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(q, a), np.sum(exact_ys), rtol=1e-4)
    gq, ga = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, a)
    np.testing.assert_allclose(gq, np.sum(exact_ys), rtol=1e-4)
    np.testing.assert_allclose(ga, -q * np.sum(exact_ys), rtol=1e-4)
    # Forward mode, one direction at a time (q alone: the ODE is not perturbed).
    forward = lambda q, a: loss(q, a, diffrax.ForwardMode())
    jvp = jax.jit(lambda v, w: jax.jvp(forward, (q, a), (v, w))[1])
    np.testing.assert_allclose(jvp(1.0, 0.0), gq, rtol=1e-10)
    np.testing.assert_allclose(jvp(0.0, 1.0), ga, rtol=1e-8)


# --------------------------------------------------------------------------------------
# Gradients through adaptive windows with rejections, including failed Newton solves.
# --------------------------------------------------------------------------------------

_LV_Y0 = jnp.array([2.0, 1.0])
# Lotka-Volterra over [0, 10] in one window of 33 points takes 30 Newton iterations (the
# sliding window crawls along it): with at most 10 that window fails, shorter ones don't.
_LV_SOLVER = DEER(num_points=33, max_iters=10)


def _lv(t, y, scale):
    return scale * lotka_volterra(t, y, None)


def _adaptive_solve(scale, y0, controller, adjoint):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_lv), _LV_SOLVER, 0.0, 10.0,
        None if isinstance(controller, diffrax.StepTo) else 10.0, y0, args=scale,
        stepsize_controller=controller, adjoint=adjoint, max_steps=256,
        saveat=diffrax.SaveAt(t1=True, steps=True),
    )


def _adaptive_loss(scale, y0, controller, adjoint):
    ys = _adaptive_solve(scale, y0, controller, adjoint).ys
    return jnp.sum(jnp.where(jnp.isfinite(ys), ys, 0.0) ** 2)


@pytest.mark.parametrize(
    "adjoint", [diffrax.RecursiveCheckpointAdjoint(), diffrax.DirectAdjoint()],
    ids=["recursive_checkpoint", "direct"],
)
def test_gradient_through_rejected_and_failed_windows(adjoint):
    # Lotka-Volterra over [0, 10] in one window: DEER's Newton iteration fails there
    # (see `_LV_SOLVER`), so the controller's first window is rejected for failing,
    # later ones for error.
    one_window = diffrax.diffeqsolve(
        diffrax.ODETerm(_lv), _LV_SOLVER, 0.0, 10.0, 10.0, _LV_Y0, args=1.0,
        throw=False,
    )
    assert one_window.result != diffrax.RESULTS.successful
    assert not bool(jnp.any(jnp.isfinite(one_window.ys)))  # no answer: NaN, not garbage
    controller = diffrax.ClipStepSizeController(
        diffrax.PIDController(rtol=1e-4, atol=1e-6), step_ts=jnp.array([5.0])
    )
    sol = _adaptive_solve(1.0, _LV_Y0, controller, adjoint)
    assert int(sol.stats["num_rejected_steps"]) > 0
    loss = lambda s, y0: _adaptive_loss(s, y0, controller, adjoint)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(1.0, _LV_Y0)
    # Finite differences of the same solver on the same (accepted) windows.
    ts = sol.ts[jnp.isfinite(sol.ts)]
    steps = diffrax.StepTo(ts=jnp.concatenate([jnp.array([0.0]), ts]))
    fixed = jax.jit(lambda s, y0: _adaptive_loss(s, y0, steps, adjoint))
    eps = 1e-6
    fd_scale = (fixed(1 + eps, _LV_Y0) - fixed(1 - eps, _LV_Y0)) / (2 * eps)
    e = jnp.array([0.0, 1.0])
    fd_y0 = (fixed(1.0, _LV_Y0 + eps * e) - fixed(1.0, _LV_Y0 - eps * e)) / (2 * eps)
    np.testing.assert_allclose(grad[0], fd_scale, rtol=1e-5)
    np.testing.assert_allclose(grad[1][1], fd_y0, rtol=1e-5)
    if isinstance(adjoint, diffrax.DirectAdjoint):  # forward mode through the same windows
        forward = lambda s: _adaptive_loss(s, _LV_Y0, controller, diffrax.ForwardMode())
        jvp = jax.jit(lambda s: jax.jvp(forward, (s,), (1.0,))[1])(1.0)
        np.testing.assert_allclose(jvp, grad[0], rtol=1e-8)


# --------------------------------------------------------------------------------------
# Error estimates: every window size, guess, method and discretisation.
# --------------------------------------------------------------------------------------

_TOL = 1e-6
_VDP_Y0 = jnp.array([2.0, 0.0])


@ft.cache
def _vdp_reference():
    return reference_solution(van_der_pol, _VDP_Y0, 1.0, 0.0, 5.0, jnp.array([5.0]))[0]


def _warm_start(t):
    return _VDP_Y0 * jnp.cos(t)


_ADAPTIVE_CASES = {
    "2": DEER(num_points=2),
    "3": DEER(num_points=3),
    "17": DEER(num_points=17),
    "65": DEER(num_points=65),
    "17-constant": DEER(num_points=17, initial_guess="constant"),
    "17-warm": DEER(num_points=17, initial_guess=_warm_start),
    "17-quasi-deer": DEER(num_points=17, method="quasi-deer"),
    "17-elk": DEER(num_points=17, method="elk"),
    "17-quasi-elk": DEER(num_points=17, method="quasi-elk"),
    "17-euler": DEER(num_points=17, discretisation=diffrax.Euler()),
    "2-tsit5": DEER(num_points=2, discretisation=diffrax.Tsit5()),
}


@pytest.mark.parametrize("case", list(_ADAPTIVE_CASES))
def test_adaptive_windows_meet_tolerance(case):
    solver = _ADAPTIVE_CASES[case]
    # DEER gives error estimates, and says so in diffrax's terms (diffrax's own code
    # and test suites branch on this).
    assert isinstance(solver, diffrax.AbstractAdaptiveSolver)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(van_der_pol), solver, 0.0, 5.0, None, _VDP_Y0, args=1.0,
        stepsize_controller=diffrax.PIDController(rtol=_TOL, atol=_TOL), max_steps=4096,
    )
    err = float(jnp.max(jnp.abs(sol.ys[-1] - _vdp_reference())))
    windows = int(sol.stats["num_accepted_steps"])
    # Each window's estimate bounds the error it commits (local error control, as
    # diffrax's solvers do): the global error is at most about their sum.
    assert err < 2 * windows * _TOL, (case, err, windows)


@pytest.mark.parametrize("num_points", [2, 9])
def test_error_estimate_is_the_local_error(num_points):
    # One window from the exact state: the estimate against the true error it commits.
    y0 = _VDP_Y0
    for h in (jnp.array(0.05), jnp.array(0.2)):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(van_der_pol), DEER(num_points=num_points), 0.0, h, h, y0,
            args=1.0,
        )
        solver = DEER(num_points=num_points)
        terms = diffrax.ODETerm(van_der_pol)
        state = solver.init(terms, 0.0, h, y0, 1.0)
        _, y_error, _, _, _ = solver.step(terms, jnp.array(0.0), jnp.array(h), y0, 1.0, state, False)
        true = jnp.abs(sol.ys[-1] - reference_solution(van_der_pol, y0, 1.0, 0.0, h, jnp.array([h]))[0])
        ratio = float(jnp.max(y_error) / jnp.max(true))
        assert 0.7 < ratio < 1.5 if num_points == 2 else 0.7 < ratio < 3, (h, ratio)


@pytest.mark.parametrize(
    "discretisation", [None, diffrax.Tsit5()], ids=["exponential", "tsit5"]
)
def test_gradients_shared_parameters_batched_initial_states(discretisation):
    # Training on a batch: `vmap` over initial states, one set of parameters; reverse
    # mode (both adjoints) and forward mode equal the per-example derivatives summed.
    def vf(t, y, a):
        return jnp.stack([a[0] * y[1], -a[1] * jnp.sin(y[0]) - 0.1 * y[1]])

    solver = DEER(num_points=33, discretisation=discretisation)

    def loss(a, y0, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), solver, 0.0, 2.0, 2.0, y0, args=a, adjoint=adjoint,
            saveat=diffrax.SaveAt(ts=jnp.array([0.7, 1.4, 2.0])),
        )
        return jnp.sum(sol.ys**2)

    a = jnp.array([1.0, 0.8])
    y0s = jnp.array([[0.5, 0.0], [1.0, -0.3], [-0.2, 0.4]])
    tangent = jnp.array([0.3, -1.1])

    @jax.jit
    def batched(a):
        out = []
        for adjoint in (diffrax.RecursiveCheckpointAdjoint(), diffrax.DirectAdjoint()):
            total = lambda a: jnp.sum(jax.vmap(lambda y0: loss(a, y0, adjoint))(y0s))
            out.append(jax.grad(total)(a))
        total = lambda a: jnp.sum(jax.vmap(lambda y0: loss(a, y0, diffrax.ForwardMode()))(y0s))
        out.append(jax.jvp(total, (a,), (tangent,))[1])
        return out

    @jax.jit
    def one(a, y0):
        return jax.grad(loss)(a, y0, diffrax.RecursiveCheckpointAdjoint())

    reference = sum(one(a, y0) for y0 in y0s)
    grad_rc, grad_direct, jvp = batched(a)
    np.testing.assert_allclose(grad_rc, reference, rtol=1e-10)
    np.testing.assert_allclose(grad_direct, reference, rtol=1e-10)
    np.testing.assert_allclose(jvp, jnp.dot(reference, tangent), rtol=1e-8)
