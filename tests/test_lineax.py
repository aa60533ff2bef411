"""The trajectory Jacobian as a lineax operator/solver pair, against dense linear
algebra: solves with the operator and its transpose, for exact (a recurrence) and
approximate (the exponential scheme; a diagonal linearisation) transitions."""

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import pytest

from diffrax_deer._discretisation import ExponentialScheme
from diffrax_deer._lineax import trajectory_jacobian, TrajectoryJacobianSolver
from diffrax_deer._misc import TreeFlattener

from .helpers import van_der_pol
from .test_root_finder import _problem as tanh_rnn


def _scheme(jacobian):
    y0 = jnp.array([2.0, 0.0])
    return ExponentialScheme(
        terms=diffrax.ODETerm(van_der_pol), args=1.0, t0=jnp.array(0.0),
        t1=jnp.array(2.0), y0=y0, flattener=TreeFlattener(y0), num_points=41,
        jacobian=jacobian,
    )


@pytest.mark.parametrize("kind", ["recurrence", "scheme"])
@pytest.mark.parametrize("jacobian", ["dense", "diagonal"])
def test_solves_with_operator_and_transpose(kind, jacobian):
    problem = tanh_rnn(jacobian) if kind == "recurrence" else _scheme(jacobian)
    T = problem.xs.shape[0] if kind == "recurrence" else problem.num_points - 1
    D = problem.init.size
    ys = 0.3 * jnp.cos(jnp.arange(T * D, dtype=float)).reshape(T, D) + problem.init[None]
    dense = jax.jacfwd(problem.residual)(ys).reshape(T * D, T * D)
    operator = trajectory_jacobian(problem, ys)
    assert operator.exact == (problem.exact_jacobian is True)
    assert jnp.allclose(operator.as_matrix(), dense)
    v = jnp.sin(jnp.arange(T * D, dtype=float)).reshape(T, D)
    solver = TrajectoryJacobianSolver(rtol=1e-13, max_steps=T + 1)
    x = lx.linear_solve(operator, v, solver).value
    expected = jnp.linalg.solve(dense, v.reshape(-1)).reshape(T, D)
    assert jnp.allclose(x, expected, rtol=1e-10, atol=1e-10)
    # The transpose: through the solver's own `transpose`, and as an operator.
    state, options = solver.transpose(solver.init(operator, {}), {})
    xt, _, _ = solver.compute(state, v, options)
    expected_t = jnp.linalg.solve(dense.T, v.reshape(-1)).reshape(T, D)
    assert jnp.allclose(xt, expected_t, rtol=1e-10, atol=1e-10)
    xt2 = lx.linear_solve(operator.transpose(), v, solver).value
    assert jnp.allclose(xt2, expected_t, rtol=1e-10, atol=1e-10)


def test_solver_needs_the_trajectory_operator():
    with pytest.raises(ValueError, match="TrajectoryJacobianOperator"):
        lx.linear_solve(lx.MatrixLinearOperator(jnp.eye(2)), jnp.ones(2), TrajectoryJacobianSolver())
