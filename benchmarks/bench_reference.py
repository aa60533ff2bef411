"""Speed of the parallel core: diffrax_deer against the DEER reference implementation.

Default mode: on Van der Pol (mu = 1, [0, 5]), the damped pendulum ([0, 20]) and the
3-D cubic decay ([0, 10]), for T = 1e4 and 1e5 grid points, float64, in one process:

- ours: one `DEER(num_points=T, rtol=1e-4, atol=1e-6)` window through
  `diffrax.diffeqsolve` (the reference's float64 default tolerances);
- the reference: `deer.solve_ivp(func, y0, xinp, params, tpts)` of
  machine-discovery/deer, imported from `$DEER_REFERENCE_PATH` (default
  `/tmp/deer_ref`); if it cannot be imported its columns are left empty and the
  output says why (its code is never copied into this repository);
- diffrax `Tsit5` with `ConstantStepSize` on the same grid.

Per problem and grid: both wall times and their ratio, our Newton iterations, the
max-abs difference of the two final states (and each one's error against Dopri8 at
rtol = atol = 1e-12), compile times and XLA's memory estimate per grid point. Then
our cost per Newton iteration, split into its parts, each timed alone on the converged
trajectory: linearisation (values and Jacobians of Δf at every point), exponentials
(`expm_phi1` of the interval-averaged Jacobians), and the parallel scan
(`linear_recurrence`).

`--max-grid` mode: the largest T (doubling from 1e5) for which one DEER window solves
the D = 4 MLP neural ODE, with `jacobian="dense"` and `"diagonal"`. Each attempt runs
in a subprocess, so an out-of-memory kill ends only that attempt; an attempt whose
compiled program is estimated to need more memory than is available is not run.

    .venv/bin/python -m benchmarks.bench_reference                 # a few minutes
    .venv/bin/python -m benchmarks.bench_reference --grids 1000 10000 100000 1000000
    .venv/bin/python -m benchmarks.bench_reference --max-grid      # longer

Results: `benchmarks/results/reference_<platform>_py<X.Y>.{json,md}` and
`maxgrid_<platform>_py<X.Y>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.<name>` runs

if "--max-grid" in sys.argv:
    # On a GPU, don't let the parent process reserve the memory its children need.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


from . import _common as common  # noqa: E402


import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import diffrax_deer  # noqa: E402
from ._problems import classical_problems, mlp_ode, Problem  # noqa: E402
from .bench_solver import (  # noqa: E402
    _max_err,
    adaptive_solve,
    deer_solve,
    tsit5_constant_solve,
)
from diffrax_deer._discretisation import ExponentialScheme  # noqa: E402
from diffrax_deer._jacobian import value_and_jacobian  # noqa: E402
from diffrax_deer._misc import TreeFlattener  # noqa: E402


# The reference's float64 defaults.
RTOL, ATOL = 1e-4, 1e-6
GRIDS = (10_000, 100_000)


def import_reference():
    """The reference package `deer`, or `(None, reason)`."""
    path = os.environ.get("DEER_REFERENCE_PATH", "/tmp/deer_ref")
    sys.path.insert(0, path)
    try:
        import deer  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - any import failure just disables the columns
        return None, f"DEER reference not importable from {path!r}: {type(e).__name__}: {e}"
    finally:
        sys.path.remove(path)
    if not hasattr(deer, "solve_ivp"):
        return None, f"module imported from {path!r} has no `solve_ivp`"
    return deer, f"DEER reference imported from {Path(deer.__file__).parent}"


def reference_solve(deer, problem: Problem):
    """`solve(y0, args, tpts, xinp) -> (y(t1), success)` with the reference."""

    def solve(y0, args, tpts, xinp):
        res = deer.solve_ivp(problem.reference_func, y0, xinp, args, tpts)
        return res.value[-1], jnp.all(res.success)

    return solve


# --------------------------------------------------------------------------------------
# Per-iteration breakdown
# --------------------------------------------------------------------------------------


def iteration_breakdown(problem: Problem, T: int, repeats: int) -> dict:
    """Times each part of one Newton iteration, alone, on the converged trajectory.

    One iteration is `scheme.linearise(ys)` (= values and Jacobians at every point,
    a little elementwise glue, then `expm_phi1` on every interval) followed by one
    `linear_recurrence`. The parts are compiled and timed separately, so they need
    not add up exactly to the whole (fusion across the boundaries is lost)."""
    y0 = problem.y0
    scheme = ExponentialScheme(
        terms=diffrax.ODETerm(problem.vf), args=problem.args,
        t0=jnp.asarray(problem.t0), t1=jnp.asarray(problem.t1), y0=y0,
        flattener=TreeFlattener(y0), num_points=T, jacobian="dense",
    )
    ts = scheme.ts

    # The converged trajectory on the grid (dense output at the grid points).
    def trajectory(y0, args):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vf), diffrax_deer.DEER(num_points=T, rtol=RTOL, atol=ATOL),
            problem.t0, problem.t1, dt0=problem.t1 - problem.t0, y0=y0, args=args,
            saveat=diffrax.SaveAt(ts=ts),
        ).ys

    ys_full = jax.jit(trajectory)(y0, problem.args)

    # Methods wrapped in lambdas: jax.jit needs hashable callables.
    lin = common.compile_jitted(
        lambda ys: value_and_jacobian(scheme._increment, scheme.ts, ys, "dense"), ys_full
    )
    F, J = lin.fn(ys_full)

    @jax.jit
    def averages(F, J, ys):
        h = F - jnp.einsum("tij,tj->ti", J, ys)
        return (J[:-1] + J[1:]) / 2, (h[:-1] + h[1:]) / 2

    X, z = averages(F, J, ys_full)
    exps = common.compile_jitted(lambda X, z: diffrax_deer.expm_phi1(X, z), X, z)
    A, b = exps.fn(X, z)
    scan = common.compile_jitted(lambda A, b: diffrax_deer.linear_recurrence(A, b, y0), A, b)
    linearise = common.compile_jitted(lambda ys: scheme.linearise(ys), ys_full[1:])

    out = {}
    for key, compiled, args in (
        ("lin_s", lin, (ys_full,)),
        ("expm_s", exps, (X, z)),
        ("scan_s", scan, (A, b)),
        ("linearise_s", linearise, (ys_full[1:],)),
    ):
        out[key] = common.time_call(compiled.fn, *args, repeats=repeats).min_s
    out["iteration_s"] = out["linearise_s"] + out["scan_s"]
    # Sanity check: the scan reproduces the trajectory it was linearised about.
    out["scan_residual"] = _max_err(scan.fn(A, b), ys_full[1:])
    return out


# --------------------------------------------------------------------------------------
# Default mode: against the reference
# --------------------------------------------------------------------------------------



def _log_row(problem, T, row, part, deer):
    msg = (f"  {problem.name:9s} T={T:<8d} ours {common.fmt_time(row['ours_s']):>9s} "
           f"({row['iters']}+{row['coarse_iters']}c it, compile {common.fmt_time(row['ours_compile_s'])}, "
           f"{common.fmt_bytes(row.get('ours_bytes_per_point'))}/pt)")
    if deer is not None:
        msg += (f" | ref {common.fmt_time(row['ref_s']):>9s} (compile "
                f"{common.fmt_time(row['ref_compile_s'])}) ratio {row['ours_over_ref']:.2f}, "
                f"|diff| {row['diff_vs_ref']:.1e}")
    if "ours_const_s" in row:
        msg += (f" | ours, constant guess {common.fmt_time(row['ours_const_s'])} "
                f"({row['ours_const_iters']} it)")
    msg += f" | Tsit5 const {common.fmt_time(row['tsit5_s'])}"
    if "lin_s" in part:
        msg += (f" | per it: lin {common.fmt_time(part['lin_s'])}, expm "
                f"{common.fmt_time(part['expm_s'])}, scan {common.fmt_time(part['scan_s'])}")
    common.log(msg)


def bench_problem(problem: Problem, grids, deer, opts) -> tuple[list[dict], list[dict]]:
    y0, args = problem.y0, problem.args
    ref_acc = common.compile_jitted(adaptive_solve(problem, diffrax.Dopri8()), y0, args, 1e-12)
    y_exact = ref_acc.fn(y0, args, 1e-12)[0]

    rows, parts = [], []
    for T in grids:
        row = dict(problem=problem.name, D=problem.dim, T=T)

        ours = common.compile_jitted(deer_solve(problem, T, RTOL, ATOL, opts.max_iters), y0, args)
        t = common.time_call(ours.fn, y0, args, repeats=opts.repeats)
        y_ours, iters, ok, coarse = t.output
        row.update(ours_s=t.min_s, ours_median_s=t.median_s, iters=int(iters),
                   coarse_iters=int(coarse), ours_success=bool(ok),
                   ours_compile_s=ours.compile_s, ours_mem_bytes=ours.memory_bytes,
                   ours_err=_max_err(y_ours, y_exact))
        if ours.memory_bytes is not None:
            row["ours_bytes_per_point"] = ours.memory_bytes / T

        # Like for like with the reference: the same constant initial guess.
        const = common.compile_jitted(deer_solve(problem, T, RTOL, ATOL, opts.max_iters,
                                          initial_guess="constant"), y0, args)
        t = common.time_call(const.fn, y0, args, repeats=opts.repeats)
        row.update(ours_const_s=t.min_s, ours_const_iters=int(t.output[1]),
                   ours_const_success=bool(t.output[2]))

        if deer is not None:
            tpts = jnp.linspace(problem.t0, problem.t1, T)
            xinp = jnp.zeros((T, 0))
            ref = common.compile_jitted(reference_solve(deer, problem), y0, args, tpts, xinp)
            t = common.time_call(ref.fn, y0, args, tpts, xinp, repeats=opts.repeats)
            y_ref, ref_ok = t.output
            row.update(ref_s=t.min_s, ref_median_s=t.median_s, ref_success=bool(ref_ok),
                       ref_compile_s=ref.compile_s, ref_mem_bytes=ref.memory_bytes,
                       ref_err=_max_err(y_ref, y_exact),
                       diff_vs_ref=_max_err(y_ours, y_ref),
                       ours_over_ref=row["ours_s"] / t.min_s)
            row["ours_const_over_ref"] = row["ours_const_s"] / t.min_s
            if ref.memory_bytes is not None:
                row["ref_bytes_per_point"] = ref.memory_bytes / T

        const = common.compile_jitted(tsit5_constant_solve(problem, T), y0, args)
        t = common.time_call(const.fn, y0, args, repeats=opts.repeats)
        row.update(tsit5_s=t.min_s, tsit5_err=_max_err(t.output[0], y_exact))
        rows.append(row)

        # Per-iteration cost of a whole solve: from the constant-guess solve where there
        # is one (the coarse-grid predictor's cheaper iterations would blur it).
        solve_s, solve_iters = ((row["ours_const_s"], row["ours_const_iters"])
                                if "ours_const_s" in row else (row["ours_s"], row["iters"]))
        part = dict(problem=problem.name, D=problem.dim, T=T, iters=solve_iters,
                    per_iter_in_solve_s=solve_s / max(solve_iters, 1))
        if not opts.no_breakdown:
            part.update(iteration_breakdown(problem, T, opts.repeats))
        parts.append(part)

        _log_row(problem, T, row, part, deer)
    return rows, parts


MAIN_COLUMNS = [
    common.PROBLEM,
    common.Column("T", "T", "{:.0e}"),
    common.Column("ours_s", "ours", common.fmt_time),
    common.Column("ref_s", "reference", common.fmt_time),
    common.Column("ours_over_ref", "ours/ref", common.fmt_ratio),
    common.Column("iters", "our it."),
    common.COARSE_ITERS,
    common.Column("ours_const_s", "ours, const. guess", common.fmt_time),
    common.Column("ours_const_over_ref", "const./ref", common.fmt_ratio),
    common.Column("ours_const_iters", "const. it."),
    common.Column("diff_vs_ref", "max abs diff", common.fmt_sci),
    common.Column("ours_err", "our err", common.fmt_sci),
    common.Column("ref_err", "ref err", common.fmt_sci),
    common.Column("ours_compile_s", "our compile", common.fmt_time),
    common.Column("ref_compile_s", "ref compile", common.fmt_time),
    common.Column("ours_bytes_per_point", "our mem/pt", common.fmt_bytes),
    common.Column("ref_bytes_per_point", "ref mem/pt", common.fmt_bytes),
    common.Column("tsit5_s", "Tsit5 const", common.fmt_time),
]

PART_COLUMNS = [
    common.PROBLEM,
    common.Column("T", "T", "{:.0e}"),
    common.Column("iters", "it."),
    common.Column("per_iter_in_solve_s", "solve / it.", common.fmt_time),
    common.Column("lin_s", "linearisation", common.fmt_time),
    common.Column("expm_s", "exponentials", common.fmt_time),
    common.Column("scan_s", "scan", common.fmt_time),
    common.Column("linearise_s", "linearise() total", common.fmt_time),
    common.Column("iteration_s", "linearise + scan", common.fmt_time),
]


def run_reference_comparison(opts):
    deer, status = import_reference()
    common.log(common.describe_machine())
    common.log(status)
    common.log(f"grids {opts.grids}, repeats {opts.repeats}, rtol={RTOL} atol={ATOL}")
    rows, parts = [], []
    for problem in classical_problems():
        common.log(f"{problem.name} (D={problem.dim}, t in [{problem.t0}, {problem.t1}])")
        r, p = bench_problem(problem, opts.grids, deer, opts)
        rows += r
        parts += p
    notes = [status]
    if deer is None:
        notes.append("Reference columns are empty: the reference could not be imported.")
    notes.append(
        "The reference's iteration count is not exposed by its API, so only ours is "
        "listed. Both solve the same exponential-trapezoid scheme, so the final states "
        "should agree to about the Newton tolerance.")
    sections = [
        common.Section("diffrax_deer vs the DEER reference (one window, same grid)",
                MAIN_COLUMNS, rows,
                description=(
                    f"Both at rtol={RTOL}, atol={ATOL} (the reference's float64 defaults). "
                    "ours: library defaults (coarse-grid initial guess where the library "
                    "has it; coarse it. = its iterations); ours, const. guess: "
                    "`initial_guess=\"constant\"`, the reference's starting point. "
                    "ours/ref < 1 means diffrax_deer is faster. "
                    "Errors: max-abs at t1 against Dopri8 (rtol = atol = 1e-12). "
                    "mem/pt: XLA's memory estimate of one call divided by T. Tsit5 const: "
                    "diffrax Tsit5 with ConstantStepSize on the same grid.")),
    ]
    if not opts.no_breakdown:
        sections.append(common.Section(
            "Our cost per Newton iteration", PART_COLUMNS, parts,
            description=(
                "Each part compiled and timed alone on the converged trajectory. "
                "linearisation: `value_and_jacobian` (Δf and its dense Jacobian at every "
                "point); exponentials: `expm_phi1` of the interval-averaged Jacobians; "
                "scan: `linear_recurrence`; linearise() total: the scheme's whole "
                "linearisation (the first two plus glue). solve / it.: a full solve's "
                "time divided by its iterations (it.; the constant-guess solve where the "
                "library has a coarse-grid predictor), setup and convergence checks "
                "included.")))
    json_path, md_path = common.write_results(
        opts.name or "reference", sections,
        title="Speed of the parallel core: diffrax_deer vs the DEER reference",
        config=dict(grids=list(opts.grids), rtol=RTOL, atol=ATOL,
                    max_iters=opts.max_iters, repeats=opts.repeats),
        notes=notes,
    )
    common.log(f"wrote {json_path}\nwrote {md_path}")


# --------------------------------------------------------------------------------------
# --max-grid mode
# --------------------------------------------------------------------------------------


def _memory_limit_bytes(cap_gb: float | None) -> int | None:
    """Memory a single solve may use: the device's limit on an accelerator, else the
    RAM currently available; at most `cap_gb` GiB if given."""
    device = jax.devices()[0]
    limit = None
    if device.platform != "cpu":
        try:
            limit = int(device.memory_stats()["bytes_limit"])
        except Exception:  # noqa: BLE001
            pass
    else:
        limit = common.available_ram_bytes()
    if cap_gb is not None:
        cap = int(cap_gb * 2**30)
        limit = cap if limit is None else min(limit, cap)
    return limit


def max_grid_child(T: int, jacobian: str, opts) -> dict:
    """One attempt (runs in a subprocess): compile, check the memory estimate, solve."""
    problem = mlp_ode(opts.max_grid_dim)
    out = dict(T=T, jacobian=jacobian)
    compiled = common.compile_jitted(
        deer_solve(problem, T, RTOL, ATOL, opts.max_iters, jacobian), problem.y0, problem.args
    )
    limit = _memory_limit_bytes(opts.max_grid_mem_gb)
    out.update(compile_s=compiled.compile_s, mem_bytes=compiled.memory_bytes,
               mem_limit_bytes=limit)
    if compiled.memory_bytes is not None and limit is not None \
            and compiled.memory_bytes > 0.95 * limit:
        out["status"] = (f"not run: memory estimate {common.fmt_bytes(compiled.memory_bytes)} "
                         f"above the limit {common.fmt_bytes(limit)}")
        return out
    t = common.time_call(compiled.fn, problem.y0, problem.args, repeats=1)
    _, iters, ok, coarse = t.output
    out.update(time_s=t.min_s, first_call_s=t.first_s, iters=int(iters),
               coarse_iters=int(coarse), success=bool(ok),
               status="solved" if ok else "not converged", peak_rss_bytes=common.rss_peak_bytes())
    return out



def _attempt(opts, T, jacobian) -> dict:
    """One window of `T` points solved in a child process: its RESULT line, or why
    there is none (killed, failed, timed out)."""
    cmd = [sys.executable, "-m", __spec__.name, "--_child", str(T), jacobian,
           "--max-iters", str(opts.max_iters),
           "--max-grid-dim", str(opts.max_grid_dim)]
    if opts.max_grid_mem_gb is not None:
        cmd += ["--max-grid-mem-gb", str(opts.max_grid_mem_gb)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=opts.attempt_timeout, cwd=REPO)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1][len("RESULT "):])
        else:
            how = (f"killed by signal {-proc.returncode} (out of memory?)"
                   if proc.returncode < 0 else f"exit code {proc.returncode}")
            tail = proc.stderr.strip().splitlines()[-1:] or [""]
            result = dict(T=T, jacobian=jacobian, status=f"{how}: {tail[0][:200]}")
    except subprocess.TimeoutExpired:
        result = dict(T=T, jacobian=jacobian,
                      status=f"timed out after {opts.attempt_timeout} s")
    result["wall_s"] = time.perf_counter() - start
    return result

def run_max_grid(opts):
    common.log(common.describe_machine())
    common.log(f"largest single DEER window for the D={opts.max_grid_dim} MLP neural ODE, "
        f"doubling T from {opts.max_grid_start:.0e} up to {opts.max_grid_limit:.0e}")
    attempts, best = [], []
    for jacobian in ("dense", "diagonal"):
        T, last_ok = opts.max_grid_start, None
        while T <= opts.max_grid_limit:
            result = _attempt(opts, T, jacobian)
            attempts.append(result)
            common.log(f"  {jacobian:8s} T={T:<11d} {result['status']}"
                + (f": {common.fmt_time(result['time_s'])}, {result['iters']} it, "
                   f"mem est. {common.fmt_bytes(result['mem_bytes'])}, peak RSS "
                   f"{common.fmt_bytes(result['peak_rss_bytes'])}" if "time_s" in result else ""))
            if result["status"] != "solved":
                break
            last_ok = result
            T *= 2
        best.append(dict(jacobian=jacobian, **({} if last_ok is None else {
            "T": last_ok["T"], "time_s": last_ok["time_s"], "iters": last_ok["iters"],
            "mem_bytes": last_ok["mem_bytes"], "peak_rss_bytes": last_ok["peak_rss_bytes"],
        }), stopped_by=attempts[-1]["status"] if attempts[-1]["status"] != "solved"
            else f"reached --max-grid-limit {opts.max_grid_limit:.0e}"))

    cols = [common.Column("jacobian", "jacobian"), common.Column("T", "largest T", "{:.3g}"),
            common.TIME, common.Column("iters", "it."),
            common.Column("mem_bytes", "XLA mem est.", common.fmt_bytes),
            common.Column("peak_rss_bytes", "peak RSS", common.fmt_bytes),
            common.Column("stopped_by", "next attempt")]
    att_cols = [common.Column("jacobian", "jacobian"), common.Column("T", "T", "{:.3g}"),
                common.Column("status", "status"), common.TIME,
                common.Column("iters", "it."), common.COARSE_ITERS,
                common.COMPILE,
                common.Column("mem_bytes", "XLA mem est.", common.fmt_bytes),
                common.Column("peak_rss_bytes", "peak RSS", common.fmt_bytes),
                common.Column("wall_s", "attempt wall", common.fmt_time)]
    json_path, md_path = common.write_results(
        opts.name or "maxgrid",
        [common.Section("Largest single window", cols, best,
                 description=(f"D={opts.max_grid_dim} MLP neural ODE (tanh, width 64, depth 2, "
                              f"contractive) on [0, 10], rtol={RTOL}, atol={ATOL}, one "
                              "window; T doubled until an attempt fails.")),
         common.Section("All attempts", att_cols, attempts)],
        title="Largest grid one DEER window solves",
        config=dict(dim=opts.max_grid_dim, start=opts.max_grid_start,
                    limit=opts.max_grid_limit, max_iters=opts.max_iters,
                    mem_cap_gb=opts.max_grid_mem_gb,
                    attempt_timeout_s=opts.attempt_timeout),
        notes=["Each attempt runs in its own process; time is one steady-state call "
               "after a warm-up call; 'peak RSS' is that process' high-water mark."],
    )
    common.log(f"wrote {json_path}\nwrote {md_path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=int, nargs="+", default=list(GRIDS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-iters", type=int, default=100)
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the per-iteration breakdown")
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--max-grid", action="store_true",
                        help="find the largest T one window solves (D=4 MLP ODE)")
    parser.add_argument("--max-grid-dim", type=int, default=4)
    parser.add_argument("--max-grid-start", type=int, default=100_000)
    parser.add_argument("--max-grid-limit", type=float, default=2e8,
                        help="stop doubling beyond this T")
    parser.add_argument("--max-grid-mem-gb", type=float, default=None,
                        help="don't run attempts whose memory estimate exceeds this "
                             "(default: the memory available when the attempt starts)")
    parser.add_argument("--attempt-timeout", type=float, default=900,
                        help="seconds before a --max-grid attempt is abandoned")
    parser.add_argument("--_child", nargs=2, metavar=("T", "JACOBIAN"),
                        help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts._child:
        result = max_grid_child(int(opts._child[0]), opts._child[1], opts)
        print("RESULT " + json.dumps(result), flush=True)
    elif opts.max_grid:
        run_max_grid(opts)
    else:
        run_reference_comparison(opts)


if __name__ == "__main__":
    main()
