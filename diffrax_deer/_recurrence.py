r"""Explicit recurrences $y_k = \Phi(p_k, y_{k-1})$ as trajectory problems.

Both of the library's explicit recurrences -- the carries of `diffrax_deer.scan` (with
$p_k = x_k$, the scanned inputs) and the fixed-step map of an explicit Runge--Kutta
solver over a window (with $p_k = (t_{k-1}, t_k)$) -- are this one shape. Their
residual is $r_k = y_k - \Phi(p_k, y_{k-1})$, and the Newton linearisation about a
trajectory $\bar y$ is

$$y_k \approx J_k y_{k-1} + \Phi(p_k, \bar y_{k-1}) - J_k \bar y_{k-1}, \qquad
J_k = \partial \Phi / \partial y\, (p_k, \bar y_{k-1}),$$

with the full Jacobian (DEER: the exact Jacobian of the residual, so the implicit
derivative is one scan) or its diagonal (quasi-DEER), the latter from a closed form
where the problem has one.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree

from ._batched import matvec
from ._jacobian import value_and_jacobian
from ._newton import AbstractTrajectoryProblem, previous_states


class AbstractExplicitRecurrence(AbstractTrajectoryProblem):
    r"""$y_k = \Phi(p_k, y_{k-1})$, $k = 1..T$, from `init` $= y_0$ (flat states).

    Subclasses give the per-step inputs `points` (a PyTree with leading axis $T$), the
    map $\Phi$ (`map(point, y)`) and the Jacobian structure (`jacobian`); optionally a
    closed-form diagonal of $\partial \Phi / \partial y$ (`closed_form_diagonal`).
    """

    jacobian: eqx.AbstractVar[Literal["dense", "diagonal"]]
    explicit_recurrence: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def points(self) -> PyTree:
        """The per-step inputs $p_1, \\dots, p_T$, stacked along a leading axis."""

    @abc.abstractmethod
    def map(self, point: Any, y: Float[Array, " D"]) -> Float[Array, " D"]:
        """$\\Phi(p_k, y_{k-1})$ for one step."""

    @property
    def closed_form_diagonal(self) -> Callable[[Any, Array], Array] | None:
        """`(point, y) -> diagonal of dPhi/dy`, or None (then from `D`
        Jacobian-vector products)."""
        return None

    @property
    def exact_jacobian(self) -> bool:
        return self.jacobian == "dense"

    def linearise(self, ys):
        prev = previous_states(self.init, ys)
        diagonal = self.closed_form_diagonal
        if diagonal is None or self.jacobian == "dense":
            values, J = value_and_jacobian(
                self.map, self.points, prev, self.jacobian, self.time_sharding
            )
        else:
            values = jax.vmap(self.map)(self.points, prev)
            J = jax.vmap(diagonal)(self.points, prev)
        return J, values - matvec(J, prev)

    def residual(self, ys):
        return ys - jax.vmap(self.map)(self.points, previous_states(self.init, ys))

    def complete(self, ys: Float[Array, "T D"], start: Int[Array, ""]) -> Float[Array, "T D"]:
        r"""`ys` with the states from index `start` on evaluated one after another,
        $y_k = \Phi(p_k, y_{k-1})$, from `ys[start - 1]` (`init` if `start` is 0):
        exact wherever the states before `start` are. Costs `T - start` sequential
        steps (none when `start == T`; under `vmap`, the batch's most)."""
        T = ys.shape[0]

        def body(carry):
            k, ys = carry
            prev = jnp.where(k > 0, ys[jnp.maximum(k - 1, 0)], self.init)
            point = jtu.tree_map(lambda p: p[k], self.points)
            return k + 1, ys.at[k].set(self.map(point, prev))

        _, ys = lax.while_loop(lambda carry: carry[0] < T, body, (start, ys))
        return ys
