"""Work-precision: error at t1 against wall time, DEER's discretisations against
diffrax's sequential adaptive solvers.

Per problem (float64; error = max-abs at `t1` against Dopri8 with
`rtol = atol = 1e-13`), each method sweeps its accuracy knob inside *one* compiled
program (the knob is a traced input), and every point is timed after compilation
(`_common.time_call`: warm-up, then the best of a few calls):

- `DEER exp, fixed`: the default exponential scheme (2nd order), windows of
  `EXP_POINTS` grid points chained with `ConstantStepSize`, `m = 1, 2, 4, ...` windows
  (knob: `dt0 = (t1 - t0) / m`);
- `DEER Tsit5, fixed`: `DEER(discretisation=diffrax.Tsit5())`, windows of `RK_POINTS`
  points, the same way;
- `DEER exp, PID` / `DEER Tsit5, PID` / `DEER Dopri5, PID`: the same solvers with
  `PIDController(rtol=tol, atol=tol)` choosing the window lengths (knob: `tol`;
  `dt0 = t1 - t0`, i.e. first try one window over the whole interval); the
  exponential scheme's error estimate is Richardson against its coarse grid, the
  Runge--Kutta ones the tableau's embedded estimate summed over each window;
- `Tsit5, PID` / `Dopri5, PID`: diffrax's sequential solvers (knob: `tol`; `dt0=None`,
  diffrax's initial-step heuristic).

Newton tolerances are DEER's defaults (1e-8 in float64; its last, quadratically
convergent step puts the answer far below that). On a CPU a parallel method cannot
beat a tight sequential loop by much: this measures work, not parallel speed-up.

    .venv/bin/python -m benchmarks.bench_work_precision           # ~10 minutes on 2 cores
    .venv/bin/python -m benchmarks.bench_work_precision --problems vdp --repeats 1

Results: `benchmarks/results/work_precision_<platform>_py<X.Y>.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import diffrax

import diffrax_deer

from . import _common as common
from ._problems import cubic_decay, mlp_ode, Problem, van_der_pol


REF_TOL = 1e-13
EXP_POINTS = 1025
RK_POINTS = 33
WINDOWS = (1, 2, 4, 8, 16, 32)
TOLS = tuple(10.0 ** -np.arange(3.0, 11.01, 1.0))
EXP_TOLS = tuple(10.0 ** -np.arange(3.0, 8.01, 1.0))  # 2nd order: more is slow
MAX_STEPS = 4096


def _max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def _problems() -> dict[str, Problem]:
    return {p.name: p for p in (van_der_pol(), cubic_decay(), mlp_ode(8))}


# --------------------------------------------------------------------------------------
# Methods: each `(y0, args, knob) -> (y(t1), extra stats...)`, one compilation.
# --------------------------------------------------------------------------------------


def _deer_stats(sol):
    state = sol.solver_state
    ok = sol.result == diffrax.RESULTS.successful
    return (sol.ys[-1], ok, state.num_windows, state.total_iters,
            state.total_coarse_iters)


def deer_fixed(problem: Problem, num_points: int, discretisation=None):
    """DEER on windows of `num_points` points, `dt0 = (t1 - t0) / knob` (constant)."""
    solver = diffrax_deer.DEER(num_points=num_points, discretisation=discretisation)

    def solve(y0, args, windows):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vf), solver, problem.t0, problem.t1,
            dt0=(problem.t1 - problem.t0) / windows, y0=y0, args=args,
            saveat=diffrax.SaveAt(t1=True, solver_state=True), max_steps=max(WINDOWS),
            throw=False,
        )
        return _deer_stats(sol)

    return solve


def deer_adaptive(problem: Problem, num_points: int, discretisation=None):
    """DEER on windows of `num_points` points chosen by a PID controller (knob: tol).
    The first window tries the whole interval (`dt0 = t1 - t0`): diffrax's `dt0=None`
    heuristic sizes a single step, so its first windows would be (N - 1)x too short."""
    solver = diffrax_deer.DEER(num_points=num_points, discretisation=discretisation)

    def solve(y0, args, tol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vf), solver, problem.t0, problem.t1,
            dt0=problem.t1 - problem.t0,
            y0=y0, args=args, saveat=diffrax.SaveAt(t1=True, solver_state=True),
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=MAX_STEPS, throw=False,
        )
        return _deer_stats(sol)

    return solve


def sequential_adaptive(problem: Problem, solver, max_steps: int = 2**20):
    def solve(y0, args, tol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vf), solver, problem.t0, problem.t1, dt0=None,
            y0=y0, args=args, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=max_steps,
        )
        ok = sol.result == diffrax.RESULTS.successful
        return sol.ys[-1], ok, sol.stats["num_steps"]

    return solve


def methods():
    """name -> (builder(problem), knobs, knob name, grid points per window or None)."""
    return {
        "DEER exp, fixed": (lambda p: deer_fixed(p, EXP_POINTS), WINDOWS, "windows",
                            EXP_POINTS),
        "DEER Tsit5, fixed": (lambda p: deer_fixed(p, RK_POINTS, diffrax.Tsit5()),
                              WINDOWS, "windows", RK_POINTS),
        "DEER exp, PID": (lambda p: deer_adaptive(p, EXP_POINTS), EXP_TOLS, "tol",
                          EXP_POINTS),
        "DEER Tsit5, PID": (lambda p: deer_adaptive(p, RK_POINTS, diffrax.Tsit5()),
                            TOLS, "tol", RK_POINTS),
        "DEER Dopri5, PID": (lambda p: deer_adaptive(p, RK_POINTS, diffrax.Dopri5()),
                             TOLS, "tol", RK_POINTS),
        "Tsit5, PID": (lambda p: sequential_adaptive(p, diffrax.Tsit5()), TOLS, "tol",
                       None),
        "Dopri5, PID": (lambda p: sequential_adaptive(p, diffrax.Dopri5()), TOLS, "tol",
                        None),
    }


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def bench_problem(problem: Problem, opts) -> list[dict]:
    y0, args = problem.y0, problem.args
    ref_fn = common.compile_jitted(sequential_adaptive(problem, diffrax.Dopri8()), y0, args,
                            REF_TOL)
    y_ref = ref_fn.fn(y0, args, REF_TOL)[0]
    rows = []
    for name, (build, knobs, knob_name, points) in methods().items():
        if opts.methods and name not in opts.methods:
            continue
        compiled = common.compile_jitted(build(problem), y0, args, knobs[0])
        common.log(f"  {name}: compiled in {common.fmt_time(compiled.compile_s)}")
        for knob in knobs:
            t = common.time_call(compiled.fn, y0, args, knob, repeats=opts.repeats,
                          max_total_s=opts.max_total_s)
            y1, ok, *stats = t.output
            row = dict(problem=problem.name, D=problem.dim, method=name,
                       knob=knob_name, value=float(knob), ok=bool(ok),
                       err=_max_err(y1, y_ref), time_s=t.min_s, median_s=t.median_s,
                       repeats=t.repeats, compile_s=compiled.compile_s)
            if points is None:
                row.update(steps=int(stats[0]))
            else:
                windows, iters, coarse = (int(s) for s in stats)
                row.update(windows=windows, steps=windows * (points - 1), iters=iters,
                           coarse_iters=coarse)
            rows.append(row)
            common.log(f"    {knob_name}={knob:<8.0e} err {row['err']:.2e}  "
                f"{common.fmt_time(row['time_s']):>9s}  steps {row['steps']:<6d}"
                + ("" if points is None else
                   f" windows {row['windows']:<4d} Newton it. {row['iters']}"
                   f"+{row['coarse_iters']}c")
                + ("" if row["ok"] else "  FAILED"))
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    names = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4.4),
                             squeeze=False)
    styles = {
        "DEER exp, fixed": ("tab:red", "o", "--"),
        "DEER Tsit5, fixed": ("tab:blue", "o", "--"),
        "DEER exp, PID": ("tab:red", "s", "-"),
        "DEER Tsit5, PID": ("tab:blue", "s", "-"),
        "DEER Dopri5, PID": ("tab:purple", "s", "-"),
        "Tsit5, PID": ("black", "^", "-"),
        "Dopri5, PID": ("tab:gray", "v", "-"),
    }
    for ax, problem in zip(axes[0], problems):
        for name in names:
            pts = [r for r in rows if r["problem"] == problem and r["method"] == name
                   and r["ok"] and r["err"] > 0]
            if not pts:
                continue
            color, marker, line = styles.get(name, (None, "x", "-"))
            ax.loglog([r["time_s"] for r in pts], [r["err"] for r in pts],
                      color=color, marker=marker, linestyle=line, label=name, ms=4)
        D = next(r["D"] for r in rows if r["problem"] == problem)
        ax.set_title(f"{problem} (D={D})")
        ax.set_xlabel("wall time [s] (post-compile, best of repeats)")
        ax.set_ylabel("max-abs error at t1")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = [
    common.PROBLEM,
    common.METHOD,
    common.Column("knob", "knob"),
    common.Column("value", "value", lambda v: f"{v:.0e}" if v < 1 else f"{v:g}"),
    common.Column("err", "error at t1", common.fmt_sci),
    common.TIME,
    common.Column("steps", "steps"),
    common.Column("windows", "windows"),
    common.NEWTON_ITERS,
    common.COARSE_ITERS,
    common.Column("ok", "ok"),
    common.COMPILE,
]


def _summary(rows: list[dict]) -> list[dict]:
    """Per problem and method: the fastest run reaching each error level."""
    out = []
    levels = (1e-4, 1e-6, 1e-8, 1e-10)
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [r for r in rows if r["problem"] == problem and r["method"] == method
                   and r["ok"]]
            if not pts:
                continue
            row = dict(problem=problem, method=method)
            for level in levels:
                good = [r["time_s"] for r in pts if r["err"] <= level]
                row[f"t{-int(math.log10(level))}"] = min(good) if good else None
            out.append(row)
    return out


SUMMARY_COLUMNS = [
    common.PROBLEM,
    common.METHOD,
    common.Column("t4", "time to err <= 1e-4", common.fmt_time),
    common.Column("t6", "<= 1e-6", common.fmt_time),
    common.Column("t8", "<= 1e-8", common.fmt_time),
    common.Column("t10", "<= 1e-10", common.fmt_time),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="*", default=None,
                        help="subset of: vdp cubic3 mlp8")
    parser.add_argument("--methods", nargs="*", default=None,
                        help=f"subset of: {', '.join(methods())}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-total-s", type=float, default=2.0,
                        help="cap on the timed calls' total time per point")
    parser.add_argument("--name", default="work_precision")
    opts = parser.parse_args(argv)

    problems = _problems()
    if opts.problems:
        problems = {k: v for k, v in problems.items() if k in opts.problems}
    common.log(common.describe_machine())
    rows = []
    for problem in problems.values():
        common.log(f"{problem.name} (D={problem.dim}, t in [{problem.t0}, {problem.t1}])")
        rows += bench_problem(problem, opts)

    info = common.machine_info()
    title = (f"Work-precision, float64, {info['cpu_model']} "
             f"({info['cpu_cores_usable']} cores), jax {info['versions']['jax']}")
    sections = [
        common.Section("Fastest time to reach an error", SUMMARY_COLUMNS, _summary(rows),
                description="Per problem and method, the least wall time among the "
                            "sweep's runs whose error at t1 is at most the level."),
        common.Section("All runs", COLUMNS, rows, description=(
            "knob `windows`: ConstantStepSize windows of the method's grid points "
            "(`steps` = grid intervals in all); knob `tol`: `PIDController(rtol=tol, "
            "atol=tol)`. DEER's `windows` are accepted windows, `Newton it.` their "
            "full-grid Newton iterations (summed), `coarse it.` those of the coarse-grid "
            "predictor. `steps` of sequential solvers: accepted + rejected steps."
        )),
    ]
    json_path, md_path = common.write_results(
        opts.name, sections, title="Work-precision: DEER discretisations vs diffrax",
        config=dict(exp_points=EXP_POINTS, rk_points=RK_POINTS, windows=list(WINDOWS),
                    tols=[float(t) for t in TOLS], exp_tols=[float(t) for t in EXP_TOLS],
                    ref_tol=REF_TOL, repeats=opts.repeats),
        notes=["Float64; on a CPU the parallel scan runs on few cores, so this measures "
               "work, not parallel speed-up.",
               f"Plot: `{md_path_name(opts.name)}.png`."],
    )
    png = json_path.with_suffix(".png")
    plot(rows, png, title)
    common.log(f"wrote {json_path}\nwrote {md_path}\nwrote {png}")


def md_path_name(name: str) -> str:
    info = common.machine_info()
    return f"{name}_{info['platform']}_py{sys.version_info.major}.{sys.version_info.minor}"


if __name__ == "__main__":
    main()
