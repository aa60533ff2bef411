"""First-call compile time of training code, each configuration in a fresh process.

A first call of a jitted solve pays tracing, lowering and XLA compilation. Measured
inside one long benchmark process those times depend on what ran before (JAX's and
equinox's caches of traced and lowered functions, the backend's warm-up), so this
script measures each (model, solver, grid, function) in its own subprocess: a trivial
jitted call first (backend start-up excluded), then `jax.jit(fn).lower(*args).compile()`
timed once (`--repeats N`: N such processes per configuration, in interleaved rounds,
the fastest reported). The functions are those of `bench_training`: the forward loss and its
reverse-mode gradient with `RecursiveCheckpointAdjoint` (diffrax's default), for the
exponential scheme (`DEER()`), the Runge--Kutta map (`DEER(discretisation=Tsit5())`,
T/10 + 1 points) and diffrax's `Tsit5` + `PIDController` (rtol = atol = 1e-8; the
tolerance's value does not change what is compiled). `DEER-constant` is `DEER()` with
`initial_guess="constant"`: the difference to `DEER` is what the coarse-grid predictor
adds to the program.

Each first call is split into tracing (Python), lowering and XLA's compilation, and the
optimised program's kernels are counted (its `fusion` instructions: on CPU, XLA compiles
each through LLVM, and its time grows with their number).

    .venv/bin/python -m benchmarks.bench_compile --grids 1000 10000 100000

Results: `benchmarks/results/compile_<platform>_py<X.Y>.{json,md}`, with each DEER
compile time as a ratio to Tsit5+PID's for the same model and function.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from . import _common as common


FUNCTIONS = ("forward", "grad_rc")
DEER_SOLVERS = ("DEER", "DEER-constant", "DEER-Tsit5")


def _measure_one(model: str, solver: str, T: int, fn_name: str) -> dict:
    """In this (fresh) process: the first-call compile time of one function."""
    common.enable_float64()
    import diffrax
    import jax
    import jax.numpy as jnp

    import diffrax_deer

    from . import bench_training as training

    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(3)))  # backend start-up
    _, vf, y0, params = training.MODELS[model]()
    if solver in ("DEER", "DEER-constant"):
        guess = "constant" if solver == "DEER-constant" else "coarse"
        deer = diffrax_deer.DEER(num_points=T, initial_guess=guess)
        fns = training._loss_fns(vf, y0, deer, training.T1)
    elif solver == "DEER-Tsit5":
        deer = diffrax_deer.DEER(num_points=T // 10 + 1, discretisation=diffrax.Tsit5())
        fns = training._loss_fns(vf, y0, deer, training.T1)
    else:
        fns = training._loss_fns(
            vf, y0, diffrax.Tsit5(), 0.01,
            stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
        )
    fn = fns[fn_name]
    if fn_name == "grad_rc" and solver == "Tsit5+PID":
        fn = jax.grad(lambda p: fns["forward"](p, max_steps=100_000))
    elif fn_name == "forward" and solver == "Tsit5+PID":
        fn = lambda p: fns["forward"](p, max_steps=100_000)  # noqa: E731
    start = time.perf_counter()
    traced = jax.jit(fn).trace(params)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    return dict(
        compile_s=end - start, trace_s=traced_at - start, lower_s=lowered_at - traced_at,
        xla_s=end - lowered_at, kernels=compiled.as_text().count(" fusion("),
    )


def _in_subprocess(model: str, solver: str, T: int, fn_name: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_compile", "--one", model, solver, str(T), fn_name],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    parser.add_argument("--models", nargs="*", default=["mlp4", "mlp16", "hnn8", "vdp"])
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh-process measurements of each configuration (the "
                             "fastest is reported)")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "SOLVER", "T", "FN"),
                        help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        model, solver, T, fn_name = opts.one
        print(json.dumps(_measure_one(model, solver, int(T), fn_name)))
        return
    # Every configuration is measured `repeats` times, in interleaved rounds (this
    # machine's speed drifts over minutes), and the fastest is reported.
    jobs = []
    for model in opts.models:
        jobs += [(model, "Tsit5+PID", 0, fn) for fn in FUNCTIONS]
        jobs += [
            (model, solver, T, fn)
            for T in opts.grids for solver in DEER_SOLVERS for fn in FUNCTIONS
        ]
    runs: dict = {job: [] for job in jobs}
    for round_ in range(opts.repeats):
        for job in jobs:
            runs[job].append(_in_subprocess(*job))
            common.log(f"round {round_ + 1}: {job}: {runs[job][-1]['compile_s']:.2f} s")
    best = {job: min(rs, key=lambda r: r["compile_s"]) for job, rs in runs.items()}

    def fill(row, model, solver, T, baseline=None):
        for fn in FUNCTIONS:
            run = best[(model, solver, T, fn)]
            row[f"{fn}_compile_s"] = run["compile_s"]
            row[f"{fn}_xla_s"] = run["xla_s"]
            row[f"{fn}_trace_lower_s"] = run["trace_s"] + run["lower_s"]
            row[f"{fn}_kernels"] = run["kernels"]
            if baseline is not None:
                row[f"{fn}_ratio"] = run["compile_s"] / baseline[f"{fn}_compile_s"]
        return row

    rows = []
    for model in opts.models:
        baseline = fill(dict(model=model, solver="Tsit5+PID(1e-8)", T=None), model, "Tsit5+PID", 0)
        rows.append(baseline)
        for T in opts.grids:
            for solver in DEER_SOLVERS:
                row = dict(model=model, solver=solver, T=T if solver != "DEER-Tsit5" else T // 10 + 1)
                rows.append(fill(row, model, solver, T, baseline))
    columns = [
        common.Column("model", "model"), common.Column("solver", "solver"),
        common.Column("T", "points"),
        common.Column("forward_compile_s", "compile fwd", common.fmt_time),
        common.Column("forward_ratio", "/ Tsit5+PID", common.fmt_ratio),
        common.Column("forward_trace_lower_s", "of which trace + lower", common.fmt_time),
        common.Column("forward_kernels", "kernels"),
        common.Column("grad_rc_compile_s", "compile grad", common.fmt_time),
        common.Column("grad_rc_ratio", "/ Tsit5+PID", common.fmt_ratio),
        common.Column("grad_rc_trace_lower_s", "of which trace + lower", common.fmt_time),
        common.Column("grad_rc_kernels", "kernels"),
    ]
    section = common.Section(
        "First-call compile time (trace + lower + XLA compile), fresh process each", columns,
        rows,
        "Loss = sum of squares at 50 saved times over [0, 5] (as in `bench_training`); "
        "grad: reverse mode with `RecursiveCheckpointAdjoint`. Ratios against the "
        "Tsit5+PID row of the same model and function. Each time is the fastest of "
        f"{opts.repeats} fresh processes, measured in interleaved rounds; the rest of "
        "it is XLA's compilation. Kernels: the `fusion` instructions of the optimised "
        "program (XLA compiles each separately). DEER-constant: `DEER()` with "
        "`initial_guess=\"constant\"` (no coarse-grid predictor).",
    )
    paths = common.write_results("compile", [section], title="First-call compile time",
                                 config=dict(grids=opts.grids, models=opts.models,
                                             repeats=opts.repeats))
    common.log(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
