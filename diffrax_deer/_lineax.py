r"""The Jacobian of a trajectory residual as a lineax operator, and its solver.

For a trajectory $y_1, \dots, y_T$ defined by the residual
$r_k(y) = y_k - \Phi_k(y_{k-1}, y_k)$, the Jacobian $L = \partial r / \partial y$ is block
lower-bidiagonal. Implicit differentiation needs solves with it and with its transpose.

`TrajectoryJacobianOperator` holds that structure, as lineax's
`TridiagonalLinearOperator` holds its diagonals: the exact products ($L x$ by a
Jacobian-vector product of the residual, $L^\top x$ by a vector-Jacobian product) and
the transitions $A_k$ of the problem's Newton linearisation at the same point, the
linear recurrence $(\tilde L x)_k = x_k - A_k x_{k-1}$ that approximates $L$ (and is
$L$ when the linearisation is exact). `TrajectoryJacobianSolver` reads the transitions
off the operator in `init`, as lineax's `Tridiagonal` reads the diagonals, and solves
with $\tilde L$ by the parallel scan (forwards, or transposed/backwards for
$L^\top$), refined by Richardson iterations (`refine`)

$$x \leftarrow x + \tilde L^{-1} (v - L x)$$

when $\tilde L \ne L$. The iteration contracts at the rate of the Newton iteration itself
(the same matrix $I - \tilde L^{-1} L$ governs both), and for diagonal (quasi)
transitions of an explicit recurrence $I - \tilde L^{-1} L$ is strictly
block-lower-triangular, so it terminates in at most $T$ iterations. Memory is that of
the transitions: $O(TD)$ for diagonal ones, no $(T, D, D)$ array is ever built for them.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, PyTree

from ._linear_recurrence import solve_linear_recurrence
from ._misc import error_if
from ._newton import AbstractTrajectoryProblem
from ._sharding import TimeSharding


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


def refine(
    apply: Callable[[Array], tuple[Array, PyTree]],
    precondition: Callable[[Array], Array],
    vector: Float[Array, "T D"],
    *,
    rtol: float,
    max_steps: int,
    aux: PyTree = None,
    correct: Callable[[Array, PyTree], PyTree] | None = None,
) -> tuple[Float[Array, "T D"], PyTree, Array]:
    r"""Solves $L x = v$ by $x \leftarrow x + \tilde L^{-1}(v - L x)$ from
    $x = \tilde L^{-1} v$, until a correction is below `rtol` relative to $x$ (at most
    `max_steps` corrections). `apply(x)` returns $L x$ and anything else computed with
    it (e.g. the parameters' part of the same backward pass), returned for the last
    $x$ it was applied to; `aux` is a value of that by-product's structure (e.g.
    zeros; None when `apply` returns None). Raises at run time if the iteration does
    not converge.

    `correct(step, aux)`, if given, returns that by-product for $x + \delta$ from the
    one for $x$ to first order in the correction $\delta$ (cheaper than `apply`). The
    iteration then also stops, with the corrected by-product, once what first order
    leaves out is within the tolerance: $\rho \|\delta\| \le$ `rtol` $\|x\|$,
    with $\rho = \|\delta\| / \|\delta_\text{previous}\|$ the observed
    contraction ($\delta_\text{previous} = \tilde L^{-1} v$ at the first step).

    Returns $x$, that by-product, and the number of products with $L$ taken. One
    loop holds the only copy of `apply` and `correct` (each is traced and compiled
    once)."""
    x = precondition(vector)

    def cond(carry):
        i, _, _, _, converged = carry
        return (i < max_steps) & jnp.invert(converged)

    def body(carry):
        i, x, _, previous, _ = carry
        product, aux = apply(x)
        step = precondition(vector - product)
        x = x + step
        size = jnp.max(jnp.abs(step))
        scale = jnp.max(jnp.abs(x))
        converged = (size <= rtol * scale) | jnp.invert(jnp.isfinite(size))
        if correct is not None:
            first_order = jnp.invert(converged) & (size * size <= rtol * scale * previous)
            aux = lax.cond(first_order, correct, lambda _, aux: aux, step, aux)
            converged = converged | first_order
        return i + 1, x, aux, size, converged

    previous = jnp.max(jnp.abs(x))
    carry = (jnp.array(0), x, aux, previous, jnp.array(False))
    num_steps, x, aux, _, converged = lax.while_loop(cond, body, carry)
    failed = jnp.invert(converged & jnp.all(jnp.isfinite(x)))
    x = error_if(x, failed, not_converged_message(max_steps))
    return x, aux, num_steps


class TrajectoryJacobianOperator(lx.AbstractLinearOperator):
    r"""$L = \partial r / \partial y$ of a trajectory problem at a trajectory (or
    $L^\top$), block lower-bidiagonal (see the module doc), with the transitions $A_k$
    of the problem's linearisation there as its structure. Built by
    `trajectory_jacobian`.

    **Fields:**

    - `jacobian`: the exact products, a `lineax.FunctionLinearOperator` of the
        residual's linearisation (or its transpose).
    - `transitions`: $A_k$, `(T, D, D)` or diagonal `(T, D)`.
    - `exact`: whether $x_k - A_k x_{k-1}$ *is* $L$ (then one scan solves).
    - `transposed`: whether this is $L^\top$.
    - `sharding`: the time axis's sharding across devices (`_sharding.py`), or None.
    """

    jacobian: lx.AbstractLinearOperator
    transitions: Array
    exact: bool = eqx.field(static=True)
    transposed: bool = eqx.field(static=True, default=False)
    sharding: TimeSharding | None = eqx.field(static=True, default=None)

    def mv(self, vector):
        return self.jacobian.mv(vector)

    def as_matrix(self):
        return self.jacobian.as_matrix()

    def transpose(self) -> "TrajectoryJacobianOperator":
        return dataclasses.replace(
            self, jacobian=self.jacobian.transpose(), transposed=not self.transposed
        )

    def in_structure(self):
        return self.jacobian.in_structure()

    def out_structure(self):
        return self.jacobian.out_structure()

    def precondition(self, vector: Float[Array, "T D"]) -> Float[Array, "T D"]:
        r"""$\tilde L^{-1} v$ (or $\tilde L^{-\top} v$): one parallel scan."""
        return solve_linear_recurrence(
            self.transitions, vector, transpose=self.transposed, sharding=self.sharding
        )


def trajectory_jacobian(
    problem: AbstractTrajectoryProblem, ys: Float[Array, "T D"]
) -> TrajectoryJacobianOperator:
    """The `TrajectoryJacobianOperator` of `problem` at `ys`: its exact products and its
    transitions from one linearisation of `problem.residual_and_transitions` (for the
    exponential scheme, one evaluation of the vector field's Jacobians serves both)."""
    return linearise_residual(problem, ys)[0]


def linearise_residual(
    problem: AbstractTrajectoryProblem, ys: Float[Array, "T D"], t_problem: PyTree = None
) -> tuple[TrajectoryJacobianOperator, Float[Array, "T D"] | None]:
    r"""`trajectory_jacobian(problem, ys)` and, for a tangent `t_problem` of the
    problem's arrays (None where not perturbed), $R\,\mathrm{d}\theta$ with
    $R = \partial r / \partial \theta$ (None if nothing is perturbed), from one
    linearisation of the residual in the trajectory and the perturbed arrays together.

    Forward mode's implicit derivative needs both at the root, and one evaluation of
    the residual then serves both; the operator's products carry a zero tangent of the
    perturbed arrays, cheaper than evaluating the residual again. (Measured against
    linearising twice, CPU, py3.11, `bench_training`'s `jax.jvp` at T = 1e4 and 1e5,
    two interleaved rounds: 17-26 fewer kernels of 500-730; run time 1-27% less in 9
    of 10 pairs, compile time less in 7 of 10.)"""
    if t_problem is None:
        perturbed = jtu.tree_map(lambda _: False, problem)
    else:
        perturbed = jtu.tree_map(
            lambda x, t: t is not None and eqx.is_inexact_array(x), problem, t_problem
        )
    diff, rest = eqx.partition(problem, perturbed)

    def residual_and_transitions(ys, diff):
        return eqx.combine(diff, rest).residual_and_transitions(ys)

    _, products, transitions = jax.linearize(
        residual_and_transitions, ys, diff, has_aux=True
    )
    zeros = jtu.tree_map(jnp.zeros_like, diff)
    operator = TrajectoryJacobianOperator(
        lx.FunctionLinearOperator(lambda x: products(x, zeros), jax.eval_shape(lambda: ys)),
        transitions,
        exact=bool(problem.exact_jacobian),
        sharding=problem.time_sharding,
    )
    if not jtu.tree_leaves(diff):
        return operator, None
    t_diff = eqx.filter(t_problem, perturbed)
    return operator, products(jnp.zeros_like(ys), t_diff)


@lx.linearise.register(TrajectoryJacobianOperator)
def _(operator):
    return dataclasses.replace(operator, jacobian=lx.linearise(operator.jacobian))


@lx.materialise.register(TrajectoryJacobianOperator)
def _(operator):
    return lx.materialise(operator.jacobian)


@lx.diagonal.register(TrajectoryJacobianOperator)
def _(operator):
    return lx.diagonal(operator.jacobian)


@lx.is_lower_triangular.register(TrajectoryJacobianOperator)
@lx.is_upper_triangular.register(TrajectoryJacobianOperator)
@lx.is_symmetric.register(TrajectoryJacobianOperator)
@lx.is_diagonal.register(TrajectoryJacobianOperator)
@lx.is_tridiagonal.register(TrajectoryJacobianOperator)
@lx.has_unit_diagonal.register(TrajectoryJacobianOperator)
@lx.is_positive_semidefinite.register(TrajectoryJacobianOperator)
@lx.is_negative_semidefinite.register(TrajectoryJacobianOperator)
def _(operator):
    # Block lower-bidiagonal, but its diagonal blocks I - dPhi_k/dy_k are full: none
    # of lineax's elementwise structures.
    return False


class TrajectoryJacobianSolver(lx.AbstractLinearSolver):
    """Solves with a `TrajectoryJacobianOperator` (or its transpose): one scan of the
    operator's transitions, refined with exact products unless they are exact (see the
    module doc).

    **Arguments:**

    - `rtol`: relative tolerance of the refinement.
    - `max_steps`: maximum number of refinement steps.
    """

    rtol: float = 1e-10
    max_steps: int = eqx.field(static=True, default=256)

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if not isinstance(operator, TrajectoryJacobianOperator):
            raise ValueError(
                "`TrajectoryJacobianSolver` solves with a `TrajectoryJacobianOperator`; "
                f"got {type(operator).__name__}."
            )
        # Linearised once: the refinement's products reuse the residual's primal pass.
        return operator if operator.exact else lx.linearise(operator)

    def compute(self, state: TrajectoryJacobianOperator, vector, options: dict[str, Any]):
        del options
        operator = state
        if operator.exact:
            x, num_steps = operator.precondition(vector), jnp.array(0)
        else:
            x, _, num_steps = refine(
                lambda x: (operator.mv(x), None), operator.precondition, vector,
                rtol=self.rtol, max_steps=self.max_steps,
            )
        return x, lx.RESULTS.successful, {"num_steps": num_steps}

    def transpose(self, state: TrajectoryJacobianOperator, options: dict[str, Any]):
        return state.transpose(), options

    def conj(self, state: TrajectoryJacobianOperator, options: dict[str, Any]):
        return state, options

    def assume_full_rank(self) -> bool:
        return True
