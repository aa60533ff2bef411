r"""The implicit derivative of a converged trajectory, as a primitive linear in the
parameters' tangent.

At the root $y$ of the residual $r(y, \theta) = 0$ (see `_newton.py`), the implicit
function theorem gives

$$\mathrm{d}y = -L^{-1} R\, \mathrm{d}\theta, \qquad L = \partial r / \partial y,
\quad R = \partial r / \partial \theta,$$

where $L$ is block lower-bidiagonal and $\tilde L$, the linear recurrence of the Newton
linearisation at $y$ (transitions $A_k$), approximates it (is it, when the
linearisation is exact).

- Forward mode: one linearisation of the residual in $y$ and $\theta$ at the root
  (`linearise_residual`) gives $R\,\mathrm{d}\theta$ and the products with $L$;
  then `lineax.linear_solve` with $L$ as a `TrajectoryJacobianOperator` and
  `TrajectoryJacobianSolver` (see `_lineax.py`): one scan, refined by Richardson steps
  $x \leftarrow x + \tilde L^{-1}(v - L x)$ when $\tilde L \ne L$.
- Reverse mode (the transpose): the cotangent $\bar\theta = -R^\top \lambda$ with
  $L^\top \lambda = \bar y$, by the transposed operator's scan refined (the same
  `refine`) by
  $\lambda \leftarrow \lambda + \tilde L^{-\top}(\bar y - L^\top \lambda)$ (one
  vector-Jacobian product of the residual per step), and $R^\top \lambda$. Where the
  residual splits into a first-order part whose derivative is exactly $\tilde L$ and
  the rest (the exponential scheme: the derivative through the vector field's
  Jacobians), a step's parameter part is corrected to first order instead of taking
  another full backward pass (`_first_order_correction`), so one usually suffices. With dense
  transitions the products are taken with respect to $y$ and $\theta$ at once and the
  last step's $\theta$ part is the answer (the correction it leaves out is within the
  tolerance); with diagonal ones (many steps) $R^\top \lambda$ is one more product at
  the end. With an exact linearisation it is one scan and one product. Nothing is
  stored between the forward solve and the gradient but the trajectory and the
  problem: the residual's linearisation is recomputed here, once, when the gradient
  is pulled back.

Wrapped as an equinox primitive (linear in its last argument, with this transpose) so
that it works under `jit`, `vmap` (of the gradient too) and inside diffrax's loops.
"""

import functools as ft

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool

from ._linear_recurrence import solve_linear_recurrence
from ._lineax import linearise_residual, refine, TrajectoryJacobianSolver
from ._misc import (
    batched_like,
    cotangents_for,
    default_tolerance,
    is_undefined,
    no_cotangents,
    traced_once,
)


def refinement_tolerance(dtype, rtol: float) -> float:
    """Relative tolerance of the implicit derivative's refinement: the Newton
    tolerance `rtol`, i.e. the accuracy of the forward solve itself, but not below
    eps^0.75 of the state's dtype (about 2e-12 in float64, 6e-6 in float32). The
    refinement contracts fast (by a factor of order the squared grid spacing times the
    vector field's curvature: measured 1e-5 to 1e-7 per step on the training
    benchmark), and each step saved is one exact Jacobian product, the most expensive
    part of a gradient."""
    return max(float(rtol), float(jnp.finfo(dtype).eps) ** 0.75, 1e-12)


def _residual(ys, problem):
    return problem.residual(ys)


def _forward(ys_at, ok, problem, t_problem, rtol, max_steps):
    """$-L^{-1} R\\, \\mathrm{d}\\theta$ (zero where not `ok`)."""
    operator, t_residual = linearise_residual(problem, ys_at, t_problem)
    if t_residual is None:
        return jnp.zeros_like(ys_at)
    t_residual = jnp.where(ok, t_residual, 0)
    solver = TrajectoryJacobianSolver(rtol=rtol, max_steps=max_steps)
    return lx.linear_solve(operator, -t_residual, solver).value


def _transpose(ys_at, ok, problem, ct, rtol, max_steps):
    """$-R^\\top L^{-\\top} \\bar y$ as a PyTree like `problem` (see module doc), and
    the number of backward passes through the residual it took."""
    ct = jnp.where(ok, ct, 0)
    # (The transposed `TrajectoryJacobianOperator`'s preconditioner, without building
    # the operator: its exact products are taken jointly with the parameters' below.
    # Taking the Newton loop's last transitions instead, carried out of the loop in its
    # state, measured slower: GRU scan D = 8, T = 1e4, gradient 20.8 -> 26.4 ms; the
    # Runge--Kutta map no faster end to end, though its backward pass alone went
    # 15.3 -> 6.9 ms. Carrying the transitions through every iteration costs more than
    # recomputing them once.)
    # Unlike forward mode's `linearise_residual`, the transitions are not taken from
    # the residual's own evaluation (`residual_and_transitions`): in reverse mode that
    # measured no faster (CPU, py3.11, Direct gradient: mlp4 T = 1e4 75 against
    # 68 ms, hnn8 T = 1e3 49.7 against 49.6 ms).
    transitions, _ = problem.linearise(ys_at)
    A = lax.stop_gradient(transitions)
    _, vjp = eqx.filter_vjp(_residual, ys_at, problem)

    def precondition(r):
        return solve_linear_recurrence(A, r, transpose=True, sharding=problem.time_sharding)

    if problem.exact_jacobian:
        lam = precondition(ct)
        return jtu.tree_map(jnp.negative, vjp(lam)[1]), jnp.array(1)

    # Dense transitions (the ODE scheme) need one or two refinement steps: each step's
    # product is taken with respect to the parameters too, and the last one's is the
    # gradient (one backward pass through the residual per step, none extra; the
    # correction left out is within the tolerance). Diagonal ones (quasi-DEER) need
    # many steps: there only the trajectory's cotangent is formed in the loop (XLA drops
    # the rest) and the parameters' once at the end, since every step's parameter part
    # but the last would be wasted. Measured (CPU, py3.11, noisy): mlp4 neural ODE
    # T = 1e4 gradient 96-108 ms joint, 119 ms separate; GRU quasi-DEER scan (D = 8,
    # T = 1e3, batch 16, 15 steps) gradient / forward 2.1-2.2x joint, 1.7-2.2x separate.
    joint = A.ndim == 3

    def apply(lam):
        g_ys, g = vjp(lam)
        return g_ys, (g if joint else None)

    # Where the problem splits its residual (the exponential scheme), a step's
    # parameter cotangent is corrected by a first-order backward pass instead of
    # another full one (see `_first_order_correction`; measured in-process, CPU,
    # py3.11: Direct gradient mlp16 T = 1e3 63.8 -> 53.9 ms, RC 75.3 -> 64.5 ms; mlp4
    # T = 1e3 9.3 -> 9.1 ms; level where one step suffices).
    first_order = problem.first_order_residual(ys_at) if joint else None
    correct = None if first_order is None else _first_order_correction(first_order, ys_at, problem)
    # (The parameters' cotangent has the structure of their arrays: built here rather
    # than traced from `apply`, which would trace the backward pass once more.)
    zeros = jtu.tree_map(jnp.zeros_like, eqx.filter(problem, eqx.is_inexact_array)) if joint else None
    lam, g_problem, num_steps = refine(
        apply, precondition, ct, rtol=rtol, max_steps=max_steps, aux=zeros, correct=correct
    )
    if not joint:
        g_problem, num_steps = vjp(lam)[1], num_steps + 1
    return jtu.tree_map(jnp.negative, g_problem), num_steps


# equinox's checkpointed loop (`diffrax.RecursiveCheckpointAdjoint`) transposes its body
# twice; see `traced_once`.
_transpose_once = traced_once(_transpose)


def _first_order_correction(first_order, ys_at, problem):
    r"""The `correct` of `refine` for problems that split their residual
    (`first_order_residual`): with the linearisation's slopes held fixed the
    residual's derivative is exactly $\tilde L$ (and a first-order part $R_1$ of $R$),
    so $L = \tilde L + K$, $R = R_1 + R_K$, where $K$, $R_K$ are the derivatives
    through the slopes (second derivatives of the vector field: the expensive part).
    After a full backward pass at $\lambda$ and the Richardson step $\delta$,

    $$R^\top (\lambda + \delta) \approx R^\top \lambda + R_1^\top \delta,$$

    a first-order backward pass only. It leaves out $R_K^\top \delta$, of the order of
    the error of $\lambda + \delta$ itself, $\rho \|\delta\|$ with $\rho$ the
    refinement's contraction (measured 1e-5 to 1e-7 on the training benchmark), which
    `refine` checks against its tolerance. So one full pass usually suffices."""

    def correct(step, g):
        _, first_vjp = eqx.filter_vjp(first_order, ys_at, problem)
        return jtu.tree_map(jnp.add, g, first_vjp(step)[1])

    return correct


@eqxi.filter_primitive_def
def _impl(ys_at, ok, problem, t_problem, rtol, max_steps):
    return [_forward(ys_at, ok, problem, t_problem, rtol, max_steps)]


@eqxi.filter_primitive_def
def _abstract_eval(ys_at, ok, problem, t_problem, rtol, max_steps):
    del ok, problem, t_problem, rtol, max_steps
    return [jax.core.ShapedArray(ys_at.shape, ys_at.dtype)]  # pyright: ignore[reportAttributeAccessIssue]


@eqxi.filter_primitive_jvp
def _jvp(primals, tangents):
    ys_at, ok, problem, t_problem, rtol, max_steps = primals
    t_ys_at, _, t_inner, t_t_problem, _, _ = tangents
    if any(x is not None for x in jtu.tree_leaves((t_ys_at, t_inner))):
        raise NotImplementedError(
            "diffrax_deer: second derivatives (Hessians) through a Newton solve are not "
            "supported."
        )
    (out,) = eqxi.filter_primitive_bind(_implicit_p, *primals)
    if all(x is None for x in jtu.tree_leaves(t_t_problem)):
        return [out], [jnp.zeros_like(out)]
    (t_out,) = eqxi.filter_primitive_bind(
        _implicit_p, ys_at, ok, problem, t_t_problem, rtol, max_steps
    )
    return [out], [t_out]


@eqxi.filter_primitive_transpose(materialise_zeros=True)  # pyright: ignore[reportCallIssue]
def _transpose_rule(inputs, cts_out):
    ys_at, ok, problem, t_problem, rtol, max_steps = inputs
    if any(is_undefined(x) for x in jtu.tree_leaves((ys_at, ok, problem))):
        raise NotImplementedError(
            "The implicit derivative is linear in the parameters' tangent only."
        )
    (ct,) = cts_out
    g_problem, _ = _transpose_once(ys_at, ok, problem, ct, rtol, max_steps)
    none = no_cotangents
    ct_t_problem = cotangents_for(t_problem, g_problem)
    return none(ys_at), none(ok), none(problem), ct_t_problem, None, None


_implicit_p = eqxi.create_vprim(
    "diffrax_deer_implicit_derivative", _impl, _abstract_eval, _jvp, _transpose_rule
)


def implicit_tangent(ys_at, ok, problem, t_problem, *, rtol: float, max_steps: int):
    r"""$-(\partial r / \partial y)^{-1} (\partial r / \partial \theta)\,
    \mathrm{d}\theta$ at the solution `ys_at` of `problem` (zero where not `ok`), for
    the tangent `t_problem` of the problem's arrays (None where not perturbed)."""
    if all(x is None for x in jtu.tree_leaves(t_problem)):
        return jnp.zeros_like(ys_at)
    t_problem = batched_like(t_problem, ys_at)
    (out,) = eqxi.filter_primitive_bind(
        _implicit_p, ys_at, ok, problem, t_problem, float(rtol), int(max_steps)
    )
    return out


class ImplicitTrajectoryAdjoint(optx.AbstractAdjoint):
    r"""An `optimistix` adjoint for root finds of a trajectory residual
    (`optimistix.root_find(fn, solver, guess, args=problem, adjoint=...)` with
    `fn(ys, problem) = problem.residual(ys)`): the implicit function theorem at the
    root, $\mathrm{d}y = -(\partial r / \partial y)^{-1} (\partial r / \partial
    \theta)\, \mathrm{d}\theta$, by `implicit_tangent` (forward and reverse mode).

    It does what `optimistix.ImplicitAdjoint` does, with the structured linear solve of
    this module instead of a generic lineax solve: `ImplicitAdjoint` would solve with
    `lineax.JacobianLinearOperator` of the residual, which neither holds the
    linearisation the root finder already has (the preconditioning scan) nor lets the
    reverse pass take the trajectory's and the parameters' products in one backward
    pass through the residual (see `_transpose`); measured on this project's training
    benchmark, those two make the gradient several times cheaper. Derivatives are
    taken with respect to the problem (`args`) only: `fn` must not close over arrays
    to be differentiated, and the guess is not differentiated. A root find that failed
    (its `result` not successful, or a non-finite root) has a zero derivative.

    The refinement tolerance follows the root finder's `rtol` (see
    `refinement_tolerance`); its steps are bounded by the root find's `max_steps`
    (or `T + 1`, enough for diagonal transitions of an explicit recurrence).
    """

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        del rewrite_fn, tags
        inputs = inputs + (ft.partial(eqxi.while_loop, kind="lax"),)
        return _root_find(inputs, primal_fn=primal_fn)


def _rtol(solver, dtype) -> float:
    """The root finder's relative tolerance (the dtype's default if it has none)."""
    rtol = getattr(solver, "rtol", None)
    return default_tolerance(dtype) if rtol is None else rtol


def completed_sequentially(root: Array, stats: dict) -> Bool[Array, ""]:
    """Whether a root find's unconverged parallel iteration was completed by
    sequential evaluation (`ParallelNewton.sequential_fallback`) to finite values:
    then `root` is the exact trajectory."""
    num_sequential = stats.get("num_sequential")
    if num_sequential is None:
        return jnp.array(False)
    return (num_sequential > 0) & jnp.all(jnp.isfinite(root))


@eqx.filter_custom_jvp
def _root_find(inputs, *, primal_fn):
    return primal_fn(inputs)


@_root_find.def_jvp
def _root_find_jvp(primals, tangents, *, primal_fn):
    (inputs,) = primals
    (t_inputs,) = tangents
    fn, solver, _, problem, _, max_steps, *_ = inputs  # optimistix's layout
    t_fn, _, _, t_problem, *t_rest = t_inputs
    if any(x is not None for x in jtu.tree_leaves((t_fn, t_rest))):
        raise ValueError(
            "diffrax_deer: a trajectory root find is differentiated with respect to "
            "its problem (`args`) only; `fn` closes over (or `options` hold) arrays "
            "that are being differentiated. Put them in the problem."
        )
    out = _root_find(inputs, primal_fn=primal_fn)
    root, (_, result, _, _, _, stats) = out  # optimistix's layout
    ok = (result == optx.RESULTS.successful) & jnp.all(jnp.isfinite(root))
    ok = ok | completed_sequentially(root, stats)
    # A failed root find has no derivative; its tangent is computed at a harmless
    # point (the initial state repeated) so that nothing non-finite, and no linear
    # solve that cannot converge, reaches the gradient.
    root_at = jnp.where(ok, root, jnp.broadcast_to(problem.init, root.shape))
    t_root = implicit_tangent(
        root_at, ok, problem, t_problem, rtol=refinement_tolerance(root.dtype, _rtol(solver, root.dtype)),
        max_steps=max(max_steps or 0, root.shape[0] + 1),
    )
    return out, (t_root, jtu.tree_map(lambda _: None, out[1]))
