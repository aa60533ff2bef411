"""DEER as a diffrax solver, against diffrax's Tsit5 on the same problems.

For each ODE and grid size T, one DEER window of T points over the whole interval
(`dt0 = t1 - t0`), float64, compared with

- Tsit5 with `ConstantStepSize` on the same grid (T - 1 steps): the sequential solver
  doing the same number of steps (more accurate: 5th order against DEER's 2nd);
- Tsit5 with a `PIDController` whose `rtol = atol` is chosen so that its error at `t1`
  is about DEER's (the largest tolerance of a sweep from 1e-2 to 1e-12 in quarter
  decades whose error is <= DEER's): the fair "same accuracy" comparison.

Errors are the max-abs difference at `t1` against Dopri8 with `rtol = atol = 1e-12`.

Per case it records: steady-state wall time (min and median), Newton iterations,
compile time, XLA's memory estimate of one call, and both solvers' errors.

    .venv/bin/python -m benchmarks.bench_solver --quick      # T <= 1e5, a few minutes
    .venv/bin/python -m benchmarks.bench_solver              # T up to 1e6
    .venv/bin/python -m benchmarks.bench_solver --max-T 10000 --problems vdp mlp8

Results: `benchmarks/results/solver[_quick]_<platform>_py<X.Y>.{json,md}`.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np


from . import _common as common


import diffrax

import diffrax_deer
from ._problems import classical_problems, mlp_ode, Problem


GRIDS = (1_000, 10_000, 100_000, 1_000_000)
MLP_DIMS = (2, 8, 32, 64)
REF_TOL = 1e-12
SWEEP_TOLS = tuple(10.0 ** -np.arange(2.0, 12.01, 0.25))


def _max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


# --------------------------------------------------------------------------------------
# The solves (pure functions of arrays, compiled ahead of time)
# --------------------------------------------------------------------------------------


_METHOD = {"dense": "deer", "diagonal": "quasi-deer"}


def deer_solve(problem: Problem, T: int, rtol: float, atol: float, max_iters: int,
               jacobian: str = "dense", **solver_options):
    """One DEER window of `T` points over the whole interval; returns
    `solve(y0, args) -> (y(t1), Newton iterations, success, coarse iterations)`.

    The last are the iterations of the coarse-grid initial-guess predictor;
    `solver_options` go to `DEER` as they are."""
    solver = diffrax_deer.DEER(num_points=T, rtol=rtol, atol=atol, max_iters=max_iters,
                               method=_METHOD[jacobian], **solver_options)

    def solve(y0, args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vf), solver, problem.t0, problem.t1,
            dt0=problem.t1 - problem.t0, y0=y0, args=args,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )
        ok = sol.result == diffrax.RESULTS.successful
        state = sol.solver_state
        return sol.ys[-1], state.total_iters, ok, state.total_coarse_iters

    return solve


def tsit5_constant_solve(problem: Problem, T: int):
    """Tsit5 with `T - 1` constant steps (the DEER grid); `solve(y0, args) -> (y(t1), steps)`."""
    dt0 = (problem.t1 - problem.t0) / (T - 1)

    def solve(y0, args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vf), diffrax.Tsit5(), problem.t0, problem.t1,
            dt0=dt0, y0=y0, args=args, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.ConstantStepSize(), max_steps=T,
        )
        return sol.ys[-1], sol.stats["num_steps"]

    return solve


def adaptive_solve(problem: Problem, solver=None, max_steps: int = 2**20):
    """Adaptive solve with `rtol = atol = tol` a traced input (one compilation for a
    whole tolerance sweep)."""
    solver = diffrax.Tsit5() if solver is None else solver

    def solve(y0, args, tol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vf), solver, problem.t0, problem.t1,
            dt0=None, y0=y0, args=args, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=max_steps,
        )
        return sol.ys[-1], sol.stats["num_steps"]

    return solve


# --------------------------------------------------------------------------------------
# Per problem
# --------------------------------------------------------------------------------------



def _time_tsit5(problem, T, row, sweep, adaptive, y_ref, opts):
    """Into `row`: Tsit5 with constant steps on DEER's grid, and adaptive Tsit5 at
    (at least) DEER's accuracy, the tolerance picked from the `sweep`."""
    y0, args = problem.y0, problem.args
    # --- Tsit5, constant steps on the same grid -----------------------------------
    const = common.compile_jitted(tsit5_constant_solve(problem, T), y0, args)
    t = common.time_call(const.fn, y0, args, repeats=opts.repeats)
    row.update(tsit5_const_s=t.min_s, tsit5_const_median_s=t.median_s,
               tsit5_const_compile_s=const.compile_s,
               tsit5_const_err=_max_err(t.output[0], y_ref))

    # --- Tsit5 adaptive at (at least) DEER's accuracy ------------------------------
    good = [s for s in sweep if s[1] <= row["deer_err"]]
    tol, err, steps = max(good) if good else min(sweep)
    t = common.time_call(adaptive.fn, y0, args, tol, repeats=opts.repeats)
    row.update(adaptive_tol=tol, adaptive_err=err, adaptive_steps=steps,
               adaptive_s=t.min_s, adaptive_median_s=t.median_s,
               adaptive_compile_s=adaptive.compile_s,
               adaptive_matched=bool(good))
    if not good:
        row["note"] = "Tsit5 misses DEER's error even at tol 1e-12"

def bench_problem(problem: Problem, grids, opts) -> list[dict]:
    y0, args = problem.y0, problem.args
    D = problem.dim

    # High-accuracy reference at t1.
    ref_fn = common.compile_jitted(adaptive_solve(problem, diffrax.Dopri8()), y0, args, REF_TOL)
    y_ref = ref_fn.fn(y0, args, REF_TOL)[0]

    # Tsit5 adaptive: one compilation, error and step count for every tolerance.
    adaptive = common.compile_jitted(adaptive_solve(problem), y0, args, 1e-3)
    sweep = []
    for tol in SWEEP_TOLS:
        y1, steps = adaptive.fn(y0, args, tol)
        sweep.append((tol, _max_err(y1, y_ref), int(steps)))

    # DEER's memory is linear in T (it holds a few (T, D, D) arrays: Jacobians, their
    # interval averages, exponentials, scan intermediates). XLA's estimate for the
    # smallest grid, scaled to larger ones, screens out cases above the budget before
    # spending time compiling them; each compiled program's own estimate is checked
    # again before it runs.
    budget = opts.mem_budget_gb * 2**30
    bytes_per_point = None
    rows = []
    for T in sorted(grids):
        row = dict(problem=problem.name, D=D, T=T)
        if opts.max_work is not None and T * D * D > opts.max_work:
            common.log(f"  {problem.name} T={T:.0e}: skipped (T*D^2 > --max-work {opts.max_work:.0e})")
            rows.append({**row, "note": "skipped: --max-work"})
            continue
        if bytes_per_point is not None and bytes_per_point * T > budget:
            common.log(f"  {problem.name} T={T:.0e}: skipped (estimated "
                f"{common.fmt_bytes(bytes_per_point * T)} > budget {opts.mem_budget_gb} GiB)")
            rows.append({**row, "note": f"skipped: ~{common.fmt_bytes(bytes_per_point * T)}"})
            continue

        # --- DEER --------------------------------------------------------------------
        deer = common.compile_jitted(deer_solve(problem, T, opts.rtol, opts.atol, opts.max_iters),
                              y0, args)
        row.update(deer_compile_s=deer.compile_s, deer_mem_bytes=deer.memory_bytes)
        if deer.memory_bytes is not None:
            bytes_per_point = deer.memory_bytes / T
        if deer.memory_bytes is not None and deer.memory_bytes > budget:
            common.log(f"  {problem.name} T={T:.0e}: skipped (compiled program needs "
                f"{common.fmt_bytes(deer.memory_bytes)})")
            rows.append({**row, "note": f"skipped: {common.fmt_bytes(deer.memory_bytes)}"})
            continue
        t = common.time_call(deer.fn, y0, args, repeats=opts.repeats)
        y1, iters, ok, coarse = t.output
        row.update(deer_s=t.min_s, deer_median_s=t.median_s, deer_repeats=t.repeats,
                   iters=int(iters), coarse_iters=int(coarse), success=bool(ok),
                   deer_err=_max_err(y1, y_ref))

        _time_tsit5(problem, T, row, sweep, adaptive, y_ref, opts)
        row["const_over_deer"] = row["tsit5_const_s"] / row["deer_s"]
        row["adaptive_over_deer"] = row["adaptive_s"] / row["deer_s"]
        rows.append(row)
        common.log(f"  {problem.name:9s} D={D:<3d} T={T:<8d} DEER {common.fmt_time(row['deer_s']):>9s} "
            f"({row['iters']}+{row['coarse_iters']}c it, err {row['deer_err']:.1e}, compile "
            f"{common.fmt_time(row['deer_compile_s'])}, mem {common.fmt_bytes(row['deer_mem_bytes'])}) | "
            f"Tsit5 const {common.fmt_time(row['tsit5_const_s']):>9s} | Tsit5 adaptive "
            f"{common.fmt_time(row['adaptive_s']):>9s} (tol {row['adaptive_tol']:.0e}, "
            f"{row['adaptive_steps']} steps, err {row['adaptive_err']:.1e})")
    return rows


COLUMNS = [
    common.PROBLEM,
    common.Column("D", "D"),
    common.Column("T", "T", "{:.0e}"),
    common.Column("deer_s", "DEER", common.fmt_time),
    common.NEWTON_ITERS,
    common.COARSE_ITERS,
    common.Column("success", "ok"),
    common.Column("deer_err", "DEER err", common.fmt_sci),
    common.Column("deer_compile_s", "DEER compile", common.fmt_time),
    common.Column("deer_mem_bytes", "DEER mem", common.fmt_bytes),
    common.Column("tsit5_const_s", "Tsit5 const", common.fmt_time),
    common.Column("tsit5_const_err", "Tsit5 const err", common.fmt_sci),
    common.Column("adaptive_s", "Tsit5 adapt.", common.fmt_time),
    common.Column("adaptive_tol", "adapt. tol", "{:.0e}"),
    common.Column("adaptive_steps", "adapt. steps"),
    common.Column("adaptive_err", "adapt. err", common.fmt_sci),
    common.Column("const_over_deer", "const/DEER", common.fmt_ratio),
    common.Column("adaptive_over_deer", "adapt./DEER", common.fmt_ratio),
    common.Column("note", "note"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="grids 1e3..1e5 and 3 repeats (a few minutes on 2 cores)")
    parser.add_argument("--max-T", type=int, default=None, help="largest grid size")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per case (default 7, or 3 with --quick)")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--atol", type=float, default=1e-8)
    parser.add_argument("--max-iters", type=int, default=100)
    parser.add_argument("--mem-budget-gb", type=float, default=8.0,
                        help="skip DEER cases whose memory estimate exceeds this")
    parser.add_argument("--max-work", type=float, default=None,
                        help="skip cases with T*D^2 above this (default: none, or 2e7 "
                             "with --quick: D=32 MLP to T <= 1e4, D=64 to T = 1e3)")
    parser.add_argument("--problems", nargs="*", default=None,
                        help="subset of: vdp pendulum cubic3 mlp2 mlp8 mlp32 mlp64")
    parser.add_argument("--name", default=None,
                        help="results file stem (default solver, or solver_quick)")
    opts = parser.parse_args(argv)
    opts.repeats = opts.repeats or (3 if opts.quick else 7)
    if opts.quick and opts.max_work is None:
        opts.max_work = 2e7
    grids = GRIDS[:3] if opts.quick else GRIDS
    if opts.max_T is not None:
        grids = tuple(T for T in grids if T <= opts.max_T)

    problems = classical_problems() + [mlp_ode(D) for D in MLP_DIMS]
    if opts.problems:
        problems = [p for p in problems if p.name in opts.problems]
    common.log(common.describe_machine())
    common.log(f"grids {grids}, repeats {opts.repeats}, DEER rtol={opts.rtol} atol={opts.atol}")

    rows = []
    for problem in problems:
        common.log(f"{problem.name} (D={problem.dim}, t in [{problem.t0}, {problem.t1}])")
        rows += bench_problem(problem, grids, opts)

    name = opts.name or ("solver_quick" if opts.quick else "solver")
    section = common.Section(
        "DEER (one window) vs diffrax Tsit5", COLUMNS, rows,
        description=(
            "DEER: one window of T points (`dt0 = t1 - t0`), library defaults apart from "
            "the tolerances; Newton it. on the full grid, coarse it. those of the "
            "coarse-grid initial-guess predictor (much cheaper each). Tsit5 const: "
            "`ConstantStepSize` on the same grid. Tsit5 adapt.: `PIDController` with "
            "`rtol = atol = tol`, the largest swept tolerance whose error is <= DEER's. "
            "Errors: max-abs at t1 vs Dopri8 (rtol = atol = 1e-12). Compile: "
            "trace + XLA compile. Mem: XLA's memory estimate of one call. Ratios > 1 "
            "mean DEER is faster."
        ),
    )
    json_path, md_path = common.write_results(
        name, [section], title="DEER as a diffrax solver",
        config=dict(grids=list(grids), rtol=opts.rtol, atol=opts.atol,
                    max_iters=opts.max_iters, repeats=opts.repeats, max_work=opts.max_work,
                    mem_budget_gb=opts.mem_budget_gb),
        notes=["Float64 throughout; on a CPU the parallel scan runs on few cores, "
               "so this measures work, not parallel speed-up."],
    )
    common.log(f"wrote {json_path}\nwrote {md_path}")


if __name__ == "__main__":
    main()
