r"""Explicit Runge--Kutta discretisations: Newton over the fixed-step map of a diffrax
solver.

On the window's uniform grid $t_0 < \dots < t_{N-1}$, an explicit one-step method
defines the trajectory by the recurrence

$$y_{k+1} = \Phi(t_k, t_{k+1}, y_k), \qquad k = 0, \dots, N-2,$$

with $\Phi$ one step of the method (for an $s$-stage tableau $(a, b, c)$:
$y_{k+1} = y_k + \sum_i b_i \kappa_i$, $\kappa_i = \Delta\, f(t_k + c_i \Delta,
y_k + \sum_{j<i} a_{ij} \kappa_j)$). That is an *explicit* nonlinear recurrence, so
Newton's method over the whole trajectory (DEER) linearises it by its exact Jacobian,

$$y_{k+1} \approx J_k y_k + \big(\Phi(\bar y_k) - J_k \bar y_k\big), \qquad
J_k = \partial \Phi / \partial y\, (t_k, t_{k+1}, \bar y_k),$$

and solves that linear recurrence for every $k$ at once with the parallel scan; its
fixed point is, to round-off, the trajectory of the sequential solver with
`diffrax.ConstantStepSize` on the same grid. No coefficient is copied here: $\Phi$ is
evaluated from the solver's own `tableau` (its stages unrolled, batched over the grid
intervals with `jax.vmap`, its Jacobian by forward-mode autodiff), computing what the
solver's own `step` computes -- next state, embedded error estimate and `dense_info`
-- so the solver's error estimate and interpolation come with it. (`diffrax.Euler`,
which has no tableau, is stepped by its own `step`.)

- error: the tableau's embedded estimate $e_k$ of every step, accumulated over the
  window as $\sum_k |e_k|$ (componentwise): a bound on the local errors the window
  commits, ignoring their propagation. With $N$ fixed, a window of length $\delta$ has
  steps $\Delta = \delta/(N-1)$ and $\sum_k |e_k| \approx (N-1)\, C \Delta^{q} \propto
  \delta^{q}$, with $q$ the order of a single step's estimate, so the window's error
  order is the solver's own `error_order`.
- dense output: the solver's own local interpolation on each grid interval (see
  `RungeKuttaGridInterpolation`).
"""

import functools as ft
from collections.abc import Callable
from typing import cast

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from diffrax import AbstractLocalInterpolation
from jaxtyping import Array, Float, Real

from ._discretisation import (
    AbstractDiscretisation,
    AbstractWindowScheme,
    ExponentialTrapezoid,
)
from ._interpolation import RungeKuttaGridInterpolation
from ._recurrence import AbstractExplicitRecurrence
from ._sharding import TimeSharding


_EXAMPLES = (
    "e.g. `diffrax.Tsit5()`, `diffrax.Dopri5()`, `diffrax.Heun()`, `diffrax.Euler()`"
)


def check_runge_kutta(solver) -> None:
    """Raises a `TypeError` unless `solver` is an explicit one-step ODE solver that
    `RungeKuttaScheme` can use: a `diffrax.AbstractERK` with a single explicit
    Butcher tableau, or `diffrax.Euler`."""
    # `type(...)`: diffrax's metaclass makes `isinstance(HalfSolver(Tsit5()), AbstractERK)`
    # true, but a wrapped solver's step is not one step of its tableau.
    kind = type(solver)
    if issubclass(kind, diffrax.Euler):
        return
    if issubclass(kind, diffrax.AbstractWrappedSolver):
        reason = "it is a wrapped solver; pass the Runge--Kutta solver itself"
    elif issubclass(kind, diffrax.AbstractERK):
        tableau = solver.tableau
        if isinstance(tableau, diffrax.ButcherTableau) and not tableau.implicit:
            return
        reason = "its tableau is not a single explicit Butcher tableau (IMEX / multi-term)"
    elif issubclass(kind, diffrax.AbstractImplicitSolver):
        reason = (
            "it is implicit: each of its steps is itself a nonlinear solve, so its map "
            "is not an explicit recurrence"
        )
    elif issubclass(kind, diffrax.AbstractSRK):
        reason = "it is a stochastic Runge--Kutta method (for SDEs)"
    elif issubclass(kind, diffrax.AbstractSolver):
        reason = (
            "it is not an explicit Runge--Kutta method (a `diffrax.AbstractERK`); SDE, "
            "multistep and reversible solvers are not supported"
        )
    else:
        reason = "it is not a diffrax solver"
    raise TypeError(
        f"`DEER(discretisation=...)` must be None or `diffrax_deer.ExponentialTrapezoid()` "
        f"(the exponential scheme), or an explicit Runge--Kutta solver of diffrax "
        f"({_EXAMPLES}); got {type(solver).__name__}: {reason}."
    )


def has_embedded_error(solver) -> bool:
    """Whether the solver gives its own error estimate (an embedded tableau)."""
    return issubclass(type(solver), diffrax.AbstractERK)


@ft.cache
def _grid_interpolation(local_cls) -> Callable[..., RungeKuttaGridInterpolation]:
    # Cached: diffrax stores this in static fields, which compare by equality.
    return ft.partial(RungeKuttaGridInterpolation, local_cls=local_cls)


def runge_kutta_interpolation(solver) -> Callable[..., RungeKuttaGridInterpolation]:
    """Dense output over a window: the solver's own interpolation per grid interval."""
    return _grid_interpolation(solver.interpolation_cls)


class RungeKuttaScheme(AbstractWindowScheme, AbstractExplicitRecurrence):
    """The fixed-step map of an explicit Runge--Kutta `solver` over one window, as an
    explicit recurrence for the Newton layer (see module doc).

    `solver` must pass `check_runge_kutta`. `jacobian="dense"` linearises
    by the exact Jacobian of the step (DEER); `"diagonal"` by its diagonal (quasi-DEER,
    same fixed point).
    """

    solver: diffrax.AbstractSolver = eqx.field(static=True)
    time_sharding: TimeSharding | None = eqx.field(static=True, default=None)  # pyright: ignore[reportIncompatibleMethodOverride] (a field for the base's property)

    @property
    def order(self) -> int:
        return cast(int, self.solver.order(self.terms))

    @property
    def interpolation_cls(self) -> Callable[..., AbstractLocalInterpolation]:
        return runge_kutta_interpolation(self.solver)

    @property
    def points(self) -> tuple[Real[Array, " N-1"], Real[Array, " N-1"]]:
        """The grid intervals $(t_{k-1}, t_k)$."""
        ts = self.ts
        return ts[:-1], ts[1:]

    def _step(self, ta, tb, y: Float[Array, " D"]):
        """One step of the solver from `(ta, y)` to `tb`: `(y1, y_error, dense_info)`,
        `y1` flat, the others PyTrees as the solver's own `step` returns them."""
        unravel, ravel = self.flattener.unravel, self.flattener.ravel
        if not issubclass(type(self.solver), diffrax.AbstractERK):
            # Euler: its own step (no stage loop).
            state = self.solver.init(self.terms, ta, tb, unravel(y), self.args)
            y1, y_error, dense_info, _, _ = self.solver.step(
                self.terms, ta, tb, unravel(y), self.args, state, made_jump=False
            )
            return ravel(y1), y_error, dense_info
        # An explicit tableau: its stages unrolled, straight from the solver's
        # `tableau`, computing what diffrax's `AbstractRungeKutta.step` computes (stage
        # times, increments, embedded error estimate, `dense_info`). Its `step` itself
        # runs the stages in a loop, and the one kind of that loop which supports both
        # autodiff modes (`scan_kind="bounded"`) measured 3-4x slower here, and slower
        # to compile. Coefficients enter as Python floats (weakly typed: the state's
        # precision is kept).
        tableau = self.solver.tableau  # pyright: ignore[reportAttributeAccessIssue]
        control = self.terms.contr(ta, tb)
        dt = tb - ta

        def increment(c, z):
            t = tb if c == 1 else ta + float(c) * dt
            return ravel(self.terms.vf_prod(t, unravel(z), self.args, control))

        def combine(coeffs, ks):
            parts = [float(a) * k for a, k in zip(coeffs, ks, strict=True) if a != 0]
            return sum(parts[1:], parts[0]) if parts else jnp.zeros_like(y)

        ks = [increment(tableau.c1, y)]
        for c, a in zip(tableau.c, tableau.a_lower, strict=True):
            ks.append(increment(c, y + combine(a, ks)))
        y1 = y + combine(tableau.b_sol, ks)
        y_error = unravel(combine(tableau.b_error, ks))
        k = self.flattener.unravel_stacked(jnp.stack(ks))
        return y1, y_error, dict(y0=unravel(y), y1=unravel(y1), k=k)

    def map(self, point, y: Float[Array, " D"]) -> Float[Array, " D"]:
        ta, tb = point  # the grid interval
        return self._step(ta, tb, y)[0]

    def outputs(self, ys_full):
        ta, tb = self.points
        _, errors, infos = jax.vmap(self._step)(ta, tb, ys_full[:-1])
        dense_info = dict(ts=self.ts, infos=infos)
        if errors is None:  # Euler: no embedded estimate
            return dense_info, self.defect_error(ys_full, self.slopes(ys_full))
        error = jnp.sum(jnp.abs(self.flattener.ravel_stacked(errors)), axis=0)
        return dense_info, error


class RungeKuttaMap(AbstractDiscretisation):
    """The fixed-step map of an explicit Runge--Kutta `solver` of diffrax (see the
    module doc): `DEER(discretisation=diffrax.Tsit5())` is shorthand for
    `DEER(discretisation=RungeKuttaMap(diffrax.Tsit5()))`. Order, error estimate and
    dense output are the solver's own; a solver without an embedded error estimate
    (`diffrax.Euler`) gets the defect estimate, of order `order + 1`."""

    solver: diffrax.AbstractSolver = eqx.field(static=True)

    def __check_init__(self):
        check_runge_kutta(self.solver)

    def window(self, **kwargs) -> RungeKuttaScheme:
        return RungeKuttaScheme(solver=self.solver, **kwargs)

    def order(self, terms) -> int:
        return cast(int, self.solver.order(terms))

    def error_order(self, terms) -> int:
        if has_embedded_error(self.solver):
            return cast(int, self.solver.error_order(terms))
        return self.order(terms) + 1

    @property
    def interpolation_cls(self) -> Callable[..., AbstractLocalInterpolation]:
        return runge_kutta_interpolation(self.solver)


def as_discretisation(discretisation) -> AbstractDiscretisation:
    """An `AbstractDiscretisation` from `DEER(discretisation=...)`'s shorthands:
    None (the exponential scheme) or a diffrax Runge--Kutta solver."""
    if discretisation is None:
        return ExponentialTrapezoid()
    if isinstance(discretisation, AbstractDiscretisation):
        return discretisation
    return RungeKuttaMap(discretisation)
