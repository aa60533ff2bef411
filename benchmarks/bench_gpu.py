"""Training, solver and scan benchmarks on one accelerator, in one run of a few minutes.

The cases of `bench_training` (neural ODE, Hamiltonian NN, Van der Pol: forward solve,
reverse-mode gradient with both adjoints, forward mode, first-call compile, XLA's
memory estimate, Newton iterations; `DEER()` and `DEER(discretisation=Tsit5())` next to
diffrax's `Tsit5` + `PIDController`) and of `bench_scan` (`diffrax_deer.scan` against
`jax.lax.scan` on a GRU, forward and gradient), at the sizes where a GPU matters:
T up to 1e6, neural-ODE state sizes D = 8..64, in float32 (matmul precision "highest")
and float64.

A lent GPU is held for minutes, and a first call compiles for seconds, so the cases run
in separate processes (one fresh process per case: `jax_enable_x64` is per process):
they compile at the same time on the host's cores, and take turns on the GPU for the
timed calls (a file lock around each `time_call`). Compile times are therefore measured
with other compiles running beside them. Cases are started in priority order and
whatever has finished by `--deadline` is written.

Errors are max-abs differences over the 50 saved times from a float64 reference
(Dopri8, rtol = atol = 1e-12) computed beforehand on the CPU
(`python -m benchmarks.bench_gpu --make-refs`, written to `.gpu/refs.npz`), so float32
runs are measured against float64 truth. Tsit5 + PID runs a tolerance sweep with the
tolerance traced (one compilation); each DEER row is matched to the loosest tolerance
whose error is at most DEER's.

    python -m benchmarks.bench_gpu --make-refs              # on the CPU, beforehand
    python -m benchmarks.bench_gpu --out DIR --deadline 400 # on the GPU machine
    # the cases a run did not reach, then both tables together:
    python -m benchmarks.bench_gpu --out DIR2 --skip DIR/rows.jsonl
    python -m benchmarks.bench_gpu --out benchmarks/results --merge DIR/rows.jsonl DIR2/rows.jsonl

Results: `DIR/gpu_<device>_py<X.Y>.{json,md}` and `DIR/rows.jsonl`; `--merge` writes the
tables and `gpu_<device>_py<X.Y>.rows.jsonl` (the rows, for the next `--skip`/`--merge`).
`benchmarks/gpu.sh` runs it on a lent machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path


REFS = Path(__file__).resolve().parent.parent / ".gpu" / "refs.npz"
T1 = 5.0
TSIT5_TOLS = {"float64": (1e-4, 1e-6, 1e-8, 1e-10), "float32": (1e-3, 1e-4, 1e-5, 1e-6)}
MODELS = ("vdp", "mlp8", "hnn8", "mlp32", "mlp64")


# --------------------------------------------------------------------------------------
# The cases, in the order they start
# --------------------------------------------------------------------------------------


def cases(quick: bool = False) -> list[dict]:
    """Each case is a small dict, run by `run_case` in its own process."""
    out = []

    def train(model, T, dtype, solver="DEER"):
        out.append(dict(kind="train", model=model, T=T, dtype=dtype, solver=solver))

    if quick:  # a smoke test of every kind of case, on the CPU
        for dtype in ("float64", "float32"):
            train("vdp", 1000, dtype)
            train("mlp8", 1000, dtype, "DEER-Tsit5")
            out.append(dict(kind="tsit5", model="vdp", dtype=dtype))
        out.append(dict(kind="scan", hidden=8, T=1000, batch=2, dtype="float32", mode="forward"))
        out.append(dict(kind="scan", hidden=8, T=1000, batch=2, dtype="float32", mode="grad"))
        return out
    for dtype in ("float32", "float64"):
        for model in ("vdp", "mlp8", "hnn8"):
            for T in (10_000, 100_000):
                train(model, T, dtype)
            out.append(dict(kind="tsit5", model=model, dtype=dtype))
    for hidden, T, batch in ((8, 100_000, 16), (32, 100_000, 4)):
        for mode in ("forward", "grad"):
            out.append(dict(kind="scan", hidden=hidden, T=T, batch=batch, dtype="float32", mode=mode))
    for dtype in ("float32", "float64"):
        for model in ("vdp", "mlp8", "hnn8"):
            train(model, 10_000, dtype, "DEER-Tsit5")
    for dtype in ("float32", "float64"):
        for model in ("mlp32", "mlp64"):
            train(model, 10_000, dtype)
            # float64 D = 64 at T = 1e5: about 100 GB for the gradient (XLA's estimate,
            # scaled from T = 1e3).
            if not (model == "mlp64" and dtype == "float64"):
                train(model, 100_000, dtype)
            out.append(dict(kind="tsit5", model=model, dtype=dtype))
        for model in ("vdp", "mlp8"):
            train(model, 1_000_000, dtype)
        for model in ("vdp", "mlp8", "hnn8", "mlp32"):
            train(model, 100_000, dtype, "DEER-Tsit5")
    # Last: lax.scan takes seconds per call at T = 1e6, holding the GPU.
    out.append(dict(kind="scan", hidden=8, T=1_000_000, batch=1, dtype="float32", mode="forward"))
    return out


def case_label(case: dict) -> str:
    if case["kind"] == "scan":
        return f"scan GRU D={case['hidden']} T={case['T']:.0e} x{case['batch']} {case['mode']} {case['dtype']}"
    if case["kind"] == "tsit5":
        return f"{case['model']} Tsit5+PID {case['dtype']}"
    return f"{case['model']} {case['solver']} T={case['T']:.0e} {case['dtype']}"


# --------------------------------------------------------------------------------------
# In the worker process
# --------------------------------------------------------------------------------------


def _setup(dtype: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", dtype == "float64")
    if dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    # The models are built in float64 (`bench_training`); without x64 they come out in
    # float32, with a warning per array.
    warnings.filterwarnings("ignore", message="Explicitly requested dtype")


def _model(key: str):
    from . import bench_training as bt

    if key.startswith("mlp"):
        return bt.neural_ode(int(key[3:]))
    return {"vdp": bt.van_der_pol, "hnn8": bt.hamiltonian_nn}[key]()


def _error(ys, model: str, dtype: str):
    import numpy as np

    ref = np.load(REFS)[f"{model}_{dtype}"]
    return float(np.max(np.abs(np.asarray(ys, np.float64)[:-1] - ref[:-1])))


def _timed(common, fn, *args, row, key, forward_key="forward"):
    timing = common.time_call(fn, *args, repeats=5, max_total_s=3.0)
    row[f"{key}_s"] = timing.min_s
    row[f"{key}_median_s"] = timing.median_s
    if key != forward_key and f"{forward_key}_s" in row:
        row[f"{key}_ratio"] = timing.min_s / row[f"{forward_key}_s"]
    return timing.output


def _train_case(case, common, row):
    import diffrax
    import jax
    import jax.numpy as jnp

    import diffrax_deer

    from . import bench_training as bt

    name, vf, y0, params = _model(case["model"])
    T = case["T"]
    if case["solver"] == "DEER":
        solver = diffrax_deer.DEER(num_points=T)
    else:
        solver = diffrax_deer.DEER(num_points=T // 10 + 1, discretisation=diffrax.Tsit5())
    row["points"] = solver.num_points
    fns = bt._loss_fns(vf, y0, solver, T1)

    def forward(p):  # the loss, plus what the table reports about the solve
        sol = bt._solve(vf, y0, p, solver, T1,
                        saveat=diffrax.SaveAt(ts=bt.SAVE, t1=True, solver_state=True))
        st = sol.solver_state
        return jnp.sum(sol.ys[:-1] ** 2), sol.ys, st.total_iters, st.total_coarse_iters

    fns["forward"] = forward
    fns = {k: f for k, f in fns.items() if k == "forward" or k in case.get("fns", fns)}
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    compiled = {}
    for key, fn in fns.items():
        args = (params, tangent) if key == "jvp" else (params,)
        c = common.compile_jitted(fn, *args)
        compiled[key] = (c, args)
        row[f"{key}_compile_s"] = c.compile_s
        row[f"{key}_memory"] = c.memory_bytes
    c, args = compiled.pop("forward")
    _, ys, iters, coarse = _timed(common, c.fn, *args, row=row, key="forward")
    row.update(error=_error(ys, case["model"], case["dtype"]), newton=int(iters), coarse=int(coarse))
    for key, (c, args) in compiled.items():
        _timed(common, c.fn, *args, row=row, key=key)


def _tsit5_case(case, common, row):
    import diffrax
    import jax
    import jax.numpy as jnp

    from . import bench_training as bt

    name, vf, y0, params = _model(case["model"])

    def solve(p, tol, adjoint=None):
        adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
        sol = bt._solve(vf, y0, p, diffrax.Tsit5(), 0.01, adjoint=adjoint,
                        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                        max_steps=100_000, throw=False)
        return sol.ys, sol.stats["num_steps"], sol.result == diffrax.RESULTS.successful

    def loss(p, tol):
        return jnp.sum(solve(p, tol)[0][:-1] ** 2)

    def forward(p, tol):
        ys, steps, ok = solve(p, tol)
        return jnp.sum(ys[:-1] ** 2), ys, steps, ok

    def jvp(p, v, tol):
        return jax.jvp(lambda q: jnp.sum(solve(q, tol, diffrax.ForwardMode())[0][:-1] ** 2),
                       (p,), (v,))[1]

    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    tol0 = jnp.asarray(1e-3)
    fwd = common.compile_jitted(forward, params, tol0)
    grad = common.compile_jitted(jax.grad(loss), params, tol0)
    tan = common.compile_jitted(jvp, params, tangent, tol0)
    row.update(forward_compile_s=fwd.compile_s, grad_rc_compile_s=grad.compile_s,
               jvp_compile_s=tan.compile_s, grad_rc_memory=grad.memory_bytes)
    sweep = []
    for tol in TSIT5_TOLS[case["dtype"]]:
        t = jnp.asarray(tol)
        r = dict(tol=tol)
        _, ys, steps, ok = _timed(common, fwd.fn, params, t, row=r, key="forward")
        r.update(error=_error(ys, case["model"], case["dtype"]), steps=int(steps), success=bool(ok))
        _timed(common, grad.fn, params, t, row=r, key="grad_rc")
        _timed(common, tan.fn, params, tangent, t, row=r, key="jvp")
        sweep.append(r)
    row["sweep"] = sweep


def _scan_case(case, common, row):
    from . import bench_scan

    rows = bench_scan.run_case(case["hidden"], case["T"], case["batch"], repeats=5,
                               max_total_s=3.0, mode=case["mode"],
                               methods=("deer", "quasi-deer+diag"), skip_above=None)
    row["methods"] = rows


def run_case(case: dict, out_dir: str, lock_path: str) -> dict:
    """Runs one case (in a fresh worker process) and appends its row to `rows.jsonl`."""
    _setup(case["dtype"])
    from . import _common as common

    time_call = common.time_call

    def locked_time_call(*args, **kwargs):  # one process on the GPU at a time
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                return time_call(*args, **kwargs)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    common.time_call = locked_time_call
    row = dict(case, label=case_label(case))
    start = time.perf_counter()
    try:
        {"train": _train_case, "tsit5": _tsit5_case, "scan": _scan_case}[case["kind"]](case, common, row)
    except Exception as e:  # noqa: BLE001 - out of memory, say: record it, go on
        row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc()
    row["case_s"] = time.perf_counter() - start
    line = json.dumps(common._jsonable(row))
    with open(lock_path + ".rows", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
        fcntl.flock(f, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        with open(os.path.join(out_dir, "rows.jsonl"), "a") as f:
            f.write(line + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] done {row['label']} in {row['case_s']:.0f} s"
          + (f" FAILED {row['failed']}" if "failed" in row else ""), flush=True)
    return row


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def _match_tsit5(rows):
    """Each DEER row gets the loosest Tsit5 tolerance (same model and dtype) whose
    error is at most DEER's, and its times."""
    sweeps = {(r["model"], r["dtype"]): r["sweep"] for r in rows
              if r["kind"] == "tsit5" and "sweep" in r}
    for r in rows:
        if r["kind"] != "train" or "error" not in r:
            continue
        sweep = sweeps.get((r["model"], r["dtype"]), [])
        good = [s for s in sweep if s["success"] and s["error"] <= r["error"]]
        if good:
            s = max(good, key=lambda s: s["tol"])
            r.update(tsit5_tol=s["tol"], tsit5_forward_s=s["forward_s"],
                     tsit5_grad_s=s["grad_rc_s"], tsit5_error=s["error"])
            r["tsit5_grad_over_deer_grad"] = s["grad_rc_s"] / r["grad_rc_s"] if "grad_rc_s" in r else None
            r["tsit5_fwd_over_deer_fwd"] = s["forward_s"] / r["forward_s"]


def sections(rows, common):
    C = common.Column
    train = sorted((r for r in rows if r["kind"] == "train"),
                   key=lambda r: (r["dtype"], MODELS.index(r["model"]), r["solver"], r["T"]))
    tsit5 = []
    for r in rows:
        if r["kind"] == "tsit5":
            for s in r.get("sweep", []):
                tsit5.append(dict(model=r["model"], dtype=r["dtype"], **s,
                                  forward_compile_s=r.get("forward_compile_s"),
                                  grad_rc_compile_s=r.get("grad_rc_compile_s")))
            if "failed" in r:
                tsit5.append(dict(model=r["model"], dtype=r["dtype"], failed=r["failed"]))
    scan = []
    for r in rows:
        if r["kind"] == "scan":
            for m in r.get("methods", []):
                scan.append(dict(m, dtype=r["dtype"]))
            if "failed" in r:
                scan.append(dict(hidden=r["hidden"], T=r["T"], mode=r["mode"], note=r["failed"]))
    scan.sort(key=lambda r: (r.get("mode", ""), r.get("hidden", 0), r.get("T", 0)))
    failed = C("failed", "failed")
    return [
        common.Section("Training through DEER", [
            C("dtype", "dtype"), C("model", "model"), C("solver", "solver"), C("T", "T", "{:.0e}"),
            C("error", "error", common.fmt_sci), C("newton", "Newton it."), C("coarse", "coarse it."),
            C("forward_s", "forward", common.fmt_time),
            C("grad_rc_s", "grad (RC)", common.fmt_time), C("grad_rc_ratio", "/ fwd", common.fmt_ratio),
            C("grad_direct_s", "grad (Direct)", common.fmt_time), C("grad_direct_ratio", "/ fwd", common.fmt_ratio),
            C("jvp_s", "jvp", common.fmt_time), C("jvp_ratio", "/ fwd", common.fmt_ratio),
            C("forward_compile_s", "compile fwd", common.fmt_time),
            C("grad_rc_compile_s", "compile grad", common.fmt_time),
            C("grad_rc_memory", "grad memory", common.fmt_bytes),
            C("tsit5_tol", "Tsit5 tol", "{:.0e}"),
            C("tsit5_fwd_over_deer_fwd", "Tsit5 fwd / DEER fwd", common.fmt_ratio),
            C("tsit5_grad_over_deer_grad", "Tsit5 grad / DEER grad", common.fmt_ratio),
            failed,
        ], train, "One window over [0, 5]; loss = sum of squares at 50 saved times. Ratios "
           "`/ fwd` are against the same row's forward solve. `Tsit5 tol`: the loosest "
           "Tsit5 + PID tolerance whose error is at most DEER's (same model and dtype; "
           "table below); the last two columns are its times over DEER's (> 1: DEER "
           "faster)."),
        common.Section("diffrax Tsit5 + PIDController (tolerance sweep)", [
            C("dtype", "dtype"), C("model", "model"), C("tol", "rtol = atol", "{:.0e}"),
            C("error", "error", common.fmt_sci), C("steps", "steps"), C("success", "ok"),
            C("forward_s", "forward", common.fmt_time),
            C("grad_rc_s", "grad (RC)", common.fmt_time), C("grad_rc_ratio", "/ fwd", common.fmt_ratio),
            C("jvp_s", "jvp", common.fmt_time), C("jvp_ratio", "/ fwd", common.fmt_ratio),
            C("forward_compile_s", "compile fwd", common.fmt_time),
            C("grad_rc_compile_s", "compile grad", common.fmt_time), failed,
        ], tsit5, "`dt0 = 0.01`, `max_steps = 100 000`, tolerance traced (one compile for the sweep)."),
        common.Section("diffrax_deer.scan against jax.lax.scan (GRU, float32)", [
            C("mode", "mode"), C("hidden", "hidden D"), C("T", "T", "{:.0e}"), C("batch", "batch"),
            common.METHOD, C("iters_max", "Newton it. (max)"),
            C("time_s", "scan", common.fmt_time), C("lax_s", "lax.scan", common.fmt_time),
            C("speedup", "lax / scan", common.fmt_ratio), C("mem", "scan mem", common.fmt_bytes),
            common.MAX_ERR, common.COMPILE, C("lax_compile_s", "lax compile", common.fmt_time),
            C("note", "note"),
        ], scan, "`mode = grad`: one `value_and_grad` of the mean square of the outputs with "
           "respect to the cell's weights; error relative to `lax.scan`'s gradient."),
    ]


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def make_refs() -> None:
    """Float64 reference solutions at the saved times (Dopri8, 1e-12), on the CPU.

    A model built without x64 is not the float64 model rounded (equinox initialises
    in the default float dtype, and `jax.random` draws differ by dtype), so each model
    gets two references: `<model>_float64`, and `<model>_float32`, the float64 solution
    of the model built in float32 (its parameters and initial state upcast)."""
    import jax
    import numpy as np

    from . import bench_training as bt

    refs = {}
    for key in MODELS:
        _setup("float32")
        _, _, y0_32, params_32 = _model(key)
        as_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
        y0_32, params_32 = as_numpy(y0_32), as_numpy(params_32)
        _setup("float64")
        _, vf, y0, params = _model(key)
        refs[f"{key}_float64"] = np.asarray(bt._reference(vf, y0, params))
        refs[f"{key}_float32"] = np.asarray(bt._reference(vf, *bt._float64((y0_32, params_32))))
        print(key, refs[f"{key}_float64"].shape, flush=True)
    REFS.parent.mkdir(exist_ok=True)
    np.savez(REFS, **refs)
    print(f"wrote {REFS}")


def _write(rows, out: Path, *, notes, config, info=None):
    _setup("float64")
    from . import _common as common

    _match_tsit5(rows)
    return common.write_results(
        "gpu", sections(rows, common), title="DEER on one GPU: training, solver and scan",
        config=config, notes=notes, results_dir=out, info=info,
        dtype_note="float32 and float64 (column dtype)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-refs", action="store_true")
    parser.add_argument("--out", default="/tmp/bench_gpu")
    parser.add_argument("--deadline", type=float, default=400.0, help="seconds")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny cases")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="rows.jsonl of earlier runs: their cases are not run again")
    parser.add_argument("--only", nargs="*", default=None,
                        help="case labels (as `case_label` writes them) to run, in this order")
    parser.add_argument("--fns", nargs="*", default=None,
                        help="of forward grad_rc grad_direct jvp: time only these (training cases)")
    parser.add_argument("--merge", nargs="*", default=None,
                        help="write the tables of these runs' rows.jsonl together, with the "
                             "machine of the first run's gpu_*.json beside it")
    opts = parser.parse_args()
    if opts.make_refs:
        return make_refs()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.merge is not None:
        rows = [json.loads(line) for f in opts.merge for line in Path(f).read_text().splitlines()]
        rows = list({r["label"]: r for r in rows}.values())  # a later run's row wins
        runs = [json.loads(next(Path(f).parent.glob("gpu_*.json")).read_text()) for f in opts.merge]
        first = runs[0]
        notes = [f"Merged from {len(runs)} runs on the same machine kind ({len(rows)} cases; "
                 "where a case ran twice, the later run's row)."]
        notes += [f"Run {k + 1} ({run['date_utc']}): `{run['command']}`. " + " ".join(run["notes"])
                  for k, run in enumerate(runs)]
        paths = _write(rows, out, notes=notes, config=first["config"], info=first["machine"])
        # The merged rows as they came, for a later run's `--skip` and `--merge`.
        raw = paths[0].with_suffix(".rows.jsonl")
        raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {paths[0]}, {paths[1]} and {raw}")
        return
    start = time.time()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    lock = os.path.join(tempfile.gettempdir(), f"bench_gpu_{os.getpid()}.lock")
    Path(lock + ".rows").unlink(missing_ok=True)
    workers = opts.workers or max(1, min(10, (os.cpu_count() or 2) - 4))
    done = {json.loads(line)["label"] for f in opts.skip for line in Path(f).read_text().splitlines()}
    todo = [c for c in cases(opts.quick) if case_label(c) not in done]
    if opts.only is not None:
        by_label = {case_label(c): c for c in todo}
        todo = [by_label[label] for label in opts.only if label in by_label]
    if opts.fns is not None:
        todo = [dict(c, fns=opts.fns) if c["kind"] == "train" else c for c in todo]
    print(f"{len(todo)} cases, {workers} workers, deadline {opts.deadline:.0f} s", flush=True)
    # One fresh process per case, at most `workers` at once. (Not `multiprocessing.Pool`:
    # its handler thread starts new workers for the queued cases as soon as running ones
    # are killed at the deadline, and those outlive this process.)
    ctx = multiprocessing.get_context("spawn")
    queue, running = list(todo), []
    while time.time() - start < opts.deadline and (queue or running):
        running = [(c, p) for c, p in running if p.is_alive()]
        while queue and len(running) < workers:
            case = queue.pop(0)
            process = ctx.Process(target=run_case, args=(case, str(out), lock))
            process.start()
            running.append((case, process))
        time.sleep(0.5)
    # A worker inside an XLA compile does not stop on SIGTERM until the compile ends.
    for _, process in running:
        process.kill()
    unfinished = [case_label(c) for c, p in running if p.exitcode is None or p.exitcode < 0]
    unfinished += [case_label(c) for c in queue]
    rows_file = Path(lock + ".rows")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    notes = [
        f"{len(rows)} of {len(todo)} cases finished in {time.time() - start:.0f} s; "
        f"{workers} worker processes compiled side by side on the host's cores and took "
        "turns on the GPU for the timed calls (compile times include that contention).",
        "float32 cases: `jax_default_matmul_precision = highest`; errors against float64 "
        "references computed on the CPU.",
    ]
    if unfinished:
        notes.append("Not finished by the deadline: " + "; ".join(unfinished) + ".")
    paths = _write(rows, out, notes=notes,
                   config=dict(deadline_s=opts.deadline, workers=workers, quick=opts.quick))
    print(Path(paths[1]).read_text(), flush=True)


if __name__ == "__main__":
    main()
