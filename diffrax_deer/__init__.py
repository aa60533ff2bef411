"""diffrax_deer: parallel-in-time evaluation of ODEs and nonlinear recurrences.

The two doors:

- [`diffrax_deer.DEER`][]: a diffrax solver, `diffrax.diffeqsolve(term, DEER(), ...)`,
  with its options as objects: a root finder ([`diffrax_deer.ParallelNewton`][],
  [`diffrax_deer.ELK`][]), an initial guess ([`diffrax_deer.CoarseGridGuess`][],
  [`diffrax_deer.ConstantGuess`][], [`diffrax_deer.WarmStartGuess`][]) and a
  discretisation ([`diffrax_deer.ExponentialTrapezoid`][],
  [`diffrax_deer.RungeKuttaMap`][] of a diffrax solver).
- [`diffrax_deer.scan`][]: `jax.lax.scan`'s contract, evaluated in parallel.

Underneath: the parallel iterations as optimistix root finders of trajectory problems
([`diffrax_deer.ParallelNewton`][], [`diffrax_deer.ELK`][], differentiated by
[`diffrax_deer.ImplicitTrajectoryAdjoint`][]), [`diffrax_deer.linear_recurrence`][]
(the parallel scan), the batched
exponentials [`diffrax_deer.expm_phi1`][] and the scheme's step
[`diffrax_deer.expm_action`][], the predictability diagnostic
[`diffrax_deer.lyapunov_exponent`][], and closed-form Jacobian diagonals of equinox's
recurrent cells for quasi-DEER ([`diffrax_deer.gru_jacobian_diagonal`][],
[`diffrax_deer.lstm_jacobian_diagonal`][]).
"""

from ._cells import (
    gru_jacobian_diagonal as gru_jacobian_diagonal,
    lstm_jacobian_diagonal as lstm_jacobian_diagonal,
)
from ._discretisation import (
    AbstractDiscretisation as AbstractDiscretisation,
    ExponentialTrapezoid as ExponentialTrapezoid,
)
from ._expm import (
    exp_phi1_diagonal as exp_phi1_diagonal,
    expm as expm,
    expm_action as expm_action,
    expm_phi1 as expm_phi1,
)
from ._implicit import ImplicitTrajectoryAdjoint as ImplicitTrajectoryAdjoint
from ._initial_guess import (
    AbstractInitialGuess as AbstractInitialGuess,
    CoarseGridGuess as CoarseGridGuess,
    ConstantGuess as ConstantGuess,
    WarmStartGuess as WarmStartGuess,
)
from ._linear_recurrence import (
    linear_recurrence as linear_recurrence,
    sequential_linear_recurrence as sequential_linear_recurrence,
)
from ._lyapunov import lyapunov_exponent as lyapunov_exponent
from ._newton import (
    AbstractTrajectoryProblem as AbstractTrajectoryProblem,
    NewtonStats as NewtonStats,
)
from ._recurrence import AbstractExplicitRecurrence as AbstractExplicitRecurrence
from ._root_finder import (
    AbstractTrajectoryRootFinder as AbstractTrajectoryRootFinder,
    ELK as ELK,
    ParallelNewton as ParallelNewton,
)
from ._runge_kutta import RungeKuttaMap as RungeKuttaMap
from ._scan import scan as scan
from ._solver import DEER as DEER, DEERState as DEERState


__version__ = "0.1.0"
