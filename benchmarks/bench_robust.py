"""The hard cases of `tests/test_robust.py`: iterations and wall time of DEER, quasi-DEER,
ELK and quasi-ELK next to sequential evaluation.

ODEs (logistic growth on [0, 20], Lotka-Volterra on [0, 10], Van der Pol mu=1 on
[0, 20], a Brusselator on [0, 20], Robertson's stiff kinetics on [0, 40], Lorenz on
[0, 8], a two-body orbit on [0, 10]) through `diffrax.diffeqsolve`, each method in two
configurations:

- `one window`: `DEER(method=...)` defaults, `dt0 = t1 - t0` (1001 points);
- `PID windows`: the recommended robust configuration, `DEER(num_points=257,
  method=...)` with `diffrax.PIDController(rtol=1e-6, atol=1e-6)` choosing the windows;

and `diffrax.Tsit5` with the same controller as the sequential baseline. The
autoregressive sine-wave GRU (T = 10 000) through `diffrax_deer.scan` with each method
(`max_iters` 100 and 400) next to `jax.lax.scan`.

Per case: the result (`successful` or why not), Newton iterations (summed over
windows; windows), the sliding window's shortenings and shortest length (see
`diffrax_deer.ParallelNewton`), max-abs error against a tight sequential reference, steady-state
wall time and compile time. Failures are timed too: how quickly a user learns that a
configuration does not work is part of the trade-off.

    .venv/bin/python -m benchmarks.bench_robust                  # all methods, ~15 min
    .venv/bin/python -m benchmarks.bench_robust --methods deer   # DEER only, ~5 min

Results: `benchmarks/results/robust_<platform>_py<X.Y>.{json,md}`.
"""

from __future__ import annotations

import argparse

from . import _common as common


import diffrax
import jax
import jax.numpy as jnp
import optimistix as optx

import diffrax_deer
from tests.helpers import ONE_WINDOW_PROBLEMS, reference_solution, sine_wave_gru


METHODS = ("deer", "quasi-deer", "elk", "quasi-elk")
GRU_LENGTH = 10_000
REPEATS = 3
MAX_TOTAL_S = 10.0


def _result_name(result, results) -> str:
    """`result`'s name in the `RESULTS` enumeration `results` (diffrax's or optimistix's)."""
    for name in (
        "successful", "nonlinear_divergence", "nonlinear_max_steps_reached",
        "max_steps_reached",
    ):
        if hasattr(results, name) and bool(result == getattr(results, name)):
            return name
    return "failed"


def ode_case(name, config, method):
    vf, y0, args, t1, stiff = ONE_WINDOW_PROBLEMS[name]
    controller = None
    if config == "one window":
        solver = diffrax_deer.DEER(method=method) if method else diffrax.Tsit5()
    else:
        controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)
        solver = (
            diffrax_deer.DEER(num_points=257, method=method) if method else diffrax.Tsit5()
        )
    kwargs = {} if controller is None else dict(stepsize_controller=controller)
    is_deer = method is not None

    def solve(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), solver, 0.0, t1, t1 if is_deer else t1 / 100, y0,
            args=args, saveat=diffrax.SaveAt(ts=jnp.linspace(0, t1, 101),
                                             solver_state=is_deer),
            throw=False, max_steps=100_000, **kwargs,
        )
        state = sol.solver_state if is_deer else None
        iters = state.total_iters if is_deer else sol.stats["num_steps"]
        windows = state.num_windows if is_deer else sol.stats["num_steps"]
        sliding = (state.total_rejected, state.min_sliding_window) if is_deer else None
        return sol.ys, sol.result, iters, windows, sliding

    compiled = common.compile_jitted(solve, y0)
    timing = common.time_call(compiled.fn, y0, repeats=REPEATS, max_total_s=MAX_TOTAL_S)
    ys, result, iters, windows, sliding = timing.output
    ref = reference_solution(vf, y0, args, 0.0, t1, jnp.linspace(0, t1, 101),
                             solver=diffrax.Kvaerno5() if stiff else diffrax.Tsit5())
    status = _result_name(result, diffrax.RESULTS)
    return dict(
        problem=name,
        config=config if is_deer else f"{config} (sequential)",
        method=method or "Tsit5",
        result=status,
        iters=int(iters) if is_deer else None,
        windows=int(windows),
        rejected=int(sliding[0]) if is_deer else None,
        min_window=int(sliding[1]) if is_deer else None,
        err=float(jnp.max(jnp.abs(ys - ref))) if status == "successful" else None,
        time_s=timing.min_s,
        compile_s=compiled.compile_s,
    )


def gru_case(method, max_iters):
    step = sine_wave_gru()
    h0 = jnp.array([0.5, 0.0, 0.0, 0.0])
    if method is None:
        fn = lambda h0: jax.lax.scan(step, h0, None, length=GRU_LENGTH)[1]  # noqa: E731
    else:

        def fn(h0):
            _, ys, stats = diffrax_deer.scan(
                step, h0, None, length=GRU_LENGTH, method=method, max_iters=max_iters,
                throw=False, return_stats=True,
            )
            return ys, stats.result, stats.num_iters, stats.num_sequential

    compiled = common.compile_jitted(fn, h0)
    timing = common.time_call(compiled.fn, h0, repeats=REPEATS, max_total_s=MAX_TOTAL_S)
    ref = jax.lax.scan(step, h0, None, length=GRU_LENGTH)[1]
    if method is None:
        ys, status, iters, sequential = timing.output, "successful", None, None
    else:
        ys, result, iters, sequential = timing.output
        status = _result_name(result, optx.RESULTS)
        iters, sequential = int(iters), int(sequential)
    return dict(
        problem=f"sine-wave GRU, T={GRU_LENGTH}",
        config=f"max_iters={max_iters}" if method else "sequential",
        method=method or "jax.lax.scan",
        result=status,
        iters=iters,
        sequential=sequential,
        err=float(jnp.max(jnp.abs(ys - ref))) if status == "successful" else None,
        time_s=timing.min_s,
        compile_s=compiled.compile_s,
    )


COLUMNS = [
    common.PROBLEM,
    common.Column("config", "configuration"),
    common.METHOD,
    common.Column("result", "result"),
    common.NEWTON_ITERS,
    common.Column("windows", "windows / steps"),
    common.Column("rejected", "shortened"),
    common.Column("min_window", "min window"),
    common.MAX_ERR,
    common.TIME,
    common.COMPILE,
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    opts = parser.parse_args()
    common.log(common.describe_machine())
    ode_rows = []
    for name in ONE_WINDOW_PROBLEMS:
        for config in ("one window", "PID windows"):
            for method in (*opts.methods, None):
                common.log(f"{name} / {config} / {method or 'Tsit5'}")
                ode_rows.append(ode_case(name, config, method))
                common.log(f"  {ode_rows[-1]}")
    gru_rows = [gru_case(None, None)]
    for max_iters in (100, 400):
        for method in opts.methods:
            common.log(f"GRU / {method} / max_iters={max_iters}")
            gru_rows.append(gru_case(method, max_iters))
            common.log(f"  {gru_rows[-1]}")
    sections = [
        common.Section(
            "Hard ODEs through diffrax.diffeqsolve",
            COLUMNS,
            ode_rows,
            description=(
                "`one window`: `DEER(method=...)` defaults (1001 points, coarse-grid "
                "initial guess), `dt0 = t1 - t0`. `PID windows`: `DEER(num_points=257)` "
                "with `PIDController(rtol=1e-6, atol=1e-6)`. Sequential: `diffrax.Tsit5` "
                "with a fixed `dt0 = (t1 - t0) / 100` (one window) or the same "
                "controller; its 'windows / steps' column is the number of steps. "
                "Newton it.: summed over windows (fine grids; the coarse predictor's "
                "iterations are extra and cheap). max err: at 101 times against Tsit5 "
                "with rtol = atol = 1e-12 (Kvaerno5 for Robertson's), only for successful solves. "
                "shortened / min window: the sliding window's shortenings (summed over "
                "windows) and its shortest length in grid intervals, fine grids only. Times include "
                "the failures: a non-successful result is returned with `throw=False`."
            ),
        ),
        common.Section(
            "Autoregressive sine-wave GRU through diffrax_deer.scan",
            [*COLUMNS[:5], common.Column("sequential", "sequential steps"), *COLUMNS[-3:]],
            gru_rows,
            description=(
                "Hidden size 4, its output fed back as its input; the hidden state "
                "circles a limit cycle around an unstable fixed point (largest "
                "Lyapunov exponent ~0). Initial guess: the initial state everywhere. "
                "sequential steps: carries evaluated one after another once `max_iters` "
                "iterations had not converged (`NewtonStats.num_sequential`)."
            ),
        ),
    ]
    methods = "" if set(opts.methods) == set(METHODS) else "_" + "_".join(opts.methods)
    common.write_results(
        f"robust{methods}",
        sections,
        title="Robustness: hard cases next to sequential evaluation",
    )


if __name__ == "__main__":
    main()
