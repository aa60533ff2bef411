r"""A lineax solver for the Jacobian of a trajectory residual.

For a trajectory $y_1, \dots, y_T$ defined by the residual
$r_k(y) = y_k - \Phi_k(y_{k-1}, y_k)$, the Jacobian $\partial r / \partial y$ is block
lower-bidiagonal. Implicit differentiation needs solves with it and with its transpose.

The Newton methods already hold an approximation of it: the linear recurrence
$x_k - A_k x_{k-1}$ whose transitions $A_k$ they linearised at the solution. This solver
uses that recurrence (solved by the parallel scan, forwards or transposed/backwards) as
a preconditioner in a Richardson iteration

$$x \leftarrow x + \tilde L^{-1} (v - L x),$$

where $L x$ is an exact Jacobian-vector product of the residual. When the recurrence is
the exact Jacobian (DEER on a recurrence), one scan solves the system and no product is
needed. Otherwise the iteration contracts at the rate of the Newton iteration itself
(the same matrix $I - \tilde L^{-1} L$ governs both), and for diagonal (quasi)
transitions $I - \tilde L^{-1} L$ is strictly block-lower-triangular, so it terminates
in at most $T$ iterations. Memory is that of the transitions: $O(TD)$ for diagonal ones,
no $(T, D, D)$ array is ever built for them.
"""

from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array

from ._linear_recurrence import linear_recurrence


def not_converged_message(max_steps: int) -> str:
    """The error raised when the implicit derivative's refinement does not converge."""
    return _NOT_CONVERGED.format(max_steps)


_NOT_CONVERGED = (
    "diffrax_deer: the implicit derivative of a converged Newton solve could not be "
    "computed: its refinement did not converge within {} steps (or became "
    "non-finite). The Newton linearisation is too far from the exact Jacobian of the "
    "scheme on this grid: use more grid points per window (a finer spacing), shorter "
    "windows (a smaller `dt0`, or `diffrax.PIDController`), or an explicit "
    "Runge--Kutta discretisation (`DEER(discretisation=diffrax.Tsit5())`), whose "
    "linearisation is exact."
)


class TrajectoryJacobianSolver(lx.AbstractLinearSolver):
    """Solves with the Jacobian of a trajectory residual (or its transpose), given the
    transitions `A` of an approximating linear recurrence.

    **Arguments:**

    - `transitions`: `(T, D, D)` or `(T, D)` transitions linearised at the solution.
    - `exact`: whether `I - A` shifted *is* the Jacobian (then one scan suffices).
    - `rtol`: relative tolerance of the refinement iteration.
    - `max_steps`: maximum number of refinement iterations.
    """

    transitions: Array
    exact: bool = eqx.field(static=True)
    rtol: float = eqx.field(static=True, default=1e-10)
    max_steps: int = eqx.field(static=True, default=256)

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if not self.exact:
            operator = lx.linearise(operator)
        return operator, self.transitions, False

    def compute(self, state, vector: Array, options: dict[str, Any]):
        del options
        operator, A, transposed = state

        def precondition(r):
            return linear_recurrence(A, r, transpose=transposed)

        x = precondition(vector)
        if self.exact:
            return x, lx.RESULTS.successful, {"num_steps": jnp.array(1)}

        def cond(carry):
            i, _, converged = carry
            return (i < self.max_steps) & jnp.invert(converged)

        def body(carry):
            i, x, _ = carry
            dx = precondition(vector - operator.mv(x))
            x = x + dx
            size = jnp.max(jnp.abs(dx))
            converged = size <= self.rtol * jnp.max(jnp.abs(x))
            converged = converged | jnp.invert(jnp.isfinite(size))
            return i + 1, x, converged

        num_steps, x, converged = lax.while_loop(
            cond, body, (jnp.array(1), x, jnp.array(False))
        )
        failed = jnp.invert(converged & jnp.all(jnp.isfinite(x)))
        x = eqx.error_if(x, failed, not_converged_message(self.max_steps))
        return x, lx.RESULTS.successful, {"num_steps": num_steps}

    def transpose(self, state, options: dict[str, Any]):
        operator, A, transposed = state
        return (operator.transpose(), A, not transposed), options

    def conj(self, state, options: dict[str, Any]):
        return state, options

    def assume_full_rank(self) -> bool:
        return True
