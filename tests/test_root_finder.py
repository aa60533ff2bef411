"""The root finders as optimistix root finders: `optimistix.root_find` on a
user-defined trajectory problem, against `jax.lax.scan` (values and gradients)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optimistix as optx
import pytest
from jaxtyping import Array

import diffrax_deer

from .helpers import tree_allclose


T, D, I = 48, 3, 2


class TanhRNN(diffrax_deer.AbstractExplicitRecurrence):
    """h_k = tanh(W h_{k-1} + U x_k), a user's own trajectory problem."""

    W: Array
    U: Array
    xs: Array
    h0: Array
    jacobian: str = eqx.field(static=True, default="dense")

    @property
    def init(self):
        return self.h0

    @property
    def points(self):
        return self.xs

    def map(self, x, h):
        return jnp.tanh(self.W @ h + self.U @ x)


def _problem(jacobian="dense"):
    kw, ku, kx = jr.split(jr.PRNGKey(0), 3)
    W = 0.8 * jr.normal(kw, (D, D)) / jnp.sqrt(D)
    return TanhRNN(W, jr.normal(ku, (D, I)), jr.normal(kx, (T, I)), jnp.full(D, 0.1), jacobian)


def _reference(problem):
    step = lambda h, x: (problem.map(x, h),) * 2
    return jax.lax.scan(step, problem.h0, problem.xs)[1]


_RESIDUAL = lambda ys, problem: problem.residual(ys)  # noqa: E731
_ROOT_FINDERS = {
    "newton": diffrax_deer.ParallelNewton(rtol=1e-12, atol=1e-12),
    "elk": diffrax_deer.ELK(rtol=1e-12, atol=1e-12, damping=0.5),
}


@pytest.mark.parametrize("jacobian", ["dense", "diagonal"])
@pytest.mark.parametrize("name", list(_ROOT_FINDERS))
def test_root_find_matches_scan(name, jacobian):
    solver = _ROOT_FINDERS[name]
    assert isinstance(solver, optx.AbstractRootFinder)
    adjoint = diffrax_deer.ImplicitTrajectoryAdjoint()

    def solve(problem):
        guess = jnp.zeros((T, D))
        return optx.root_find(_RESIDUAL, solver, guess, args=problem, adjoint=adjoint, max_steps=T)

    problem = _problem(jacobian)
    sol = eqx.filter_jit(solve)(problem)
    assert sol.result == optx.RESULTS.successful
    assert tree_allclose(sol.value, _reference(problem), rtol=1e-10, atol=1e-10)
    assert 1 <= int(sol.stats["num_steps"]) <= T

    # Gradients with respect to the problem (weights, inputs, initial state), both
    # modes, against lax.scan's.
    loss = lambda p, f: jnp.sum(jnp.sin(f(p)))
    got = eqx.filter_jit(eqx.filter_grad(lambda p: loss(p, lambda q: solve(q).value)))(problem)
    want = eqx.filter_jit(eqx.filter_grad(lambda p: loss(p, _reference)))(problem)
    assert tree_allclose(got, want, rtol=1e-8, atol=1e-8)
    tangent = jax.tree_util.tree_map(lambda x: jnp.cos(x) if eqx.is_inexact_array(x) else None, problem)
    got = eqx.filter_jvp(lambda p: solve(p).value, (problem,), (tangent,))[1]
    want = eqx.filter_jvp(_reference, (problem,), (tangent,))[1]
    assert tree_allclose(got, want, rtol=1e-8, atol=1e-8)


def test_root_finder_errors():
    problem = _problem()
    guess = jnp.zeros((T, D))
    newton = _ROOT_FINDERS["newton"]
    with pytest.raises(TypeError, match="trajectory problem"):
        optx.root_find(lambda y, a: y - a, newton, guess, args=jnp.ones((T, D)))
    with pytest.raises(ValueError, match="damping"):
        diffrax_deer.ELK(rtol=1e-8, atol=1e-8, damping=0.0)

    # A residual that closes over an array being differentiated: say so, rather than
    # return a gradient that leaves it out.
    def closes_over(scale):
        fn = lambda ys, p: p.residual(ys) * scale
        adjoint = diffrax_deer.ImplicitTrajectoryAdjoint()
        return optx.root_find(fn, newton, guess, args=problem, adjoint=adjoint).value.sum()

    with pytest.raises(ValueError, match="problem"):
        jax.grad(closes_over)(1.0)
