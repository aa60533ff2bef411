"""Sequence parallelism: one trajectory sharded along time over host devices (`mesh=`).

Two workloads, each measured in a fresh process whose CPU is split into `P` host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=P`, one per core):

- `node`: a neural ODE (the `mlp4` model of `bench_training`: `eqx.nn.MLP(4, 4, 32,
  depth=2, tanh)`, vector field `m(y) - 0.5 y` on [0, 5]) solved by `DEER()` in one
  window of `T` intervals; loss = sum of squares at 50 saved times;
- `gru`: `diffrax_deer.scan` of a random `equinox.nn.GRUCell(4, 8)` over `T` random
  inputs; loss = sum of squares of the outputs.

For each: forward (loss) and reverse-mode gradient (`jax.grad`; the cell's weights /
the MLP's parameters) steady-state times, Newton iterations, first-call compile time,
XLA's per-device memory estimate of the compiled gradient (arguments + outputs +
temporaries), and the per-phase split: one linear recurrence of the solve's shape
(`(T, D, D)` transitions; the scan phase) and the exchange alone (the all-gather of
the `P` aggregate maps and the length-`P` prefix, in a `shard_map` of its own).
`P = 1` rows run without a mesh (today's single-device code); one of them with the
process pinned to one core (`taskset`), to show how much of the machine one device's
own threads already use. Each case runs in
`--rounds` fresh processes, the cases alternating, and every time is the minimum over
them (this machine's timings drift by up to 2x between runs).

Strong scaling: fixed `T`, 1 and 2 devices. Weak scaling: `T / P` fixed. "Longest
grid": the per-device memory per grid point of the gradient, and the grid that fits
a per-device budget of 1 GiB (extrapolated linearly from the measured `T`; on a host
the devices share one RAM, so this is what separate devices, e.g. GPUs, would hold).

    python -m benchmarks.bench_sharding                 # ~15 minutes on a 2-core CPU
    python -m benchmarks.bench_sharding --T 20000 --devices 1 2

Results: `benchmarks/results/sharding_<platform>_py<X.Y>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


BUDGET_BYTES = 2**30


def _workload(name: str, T: int, mesh):
    """`(loss, params, iterations)`: the loss of `params`, its parameters, and a
    function of `params` returning the Newton iterations."""
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import diffrax_deer

    from .bench_training import MODELS, SAVE, T1

    if name == "node":
        _, vf, y0, params = MODELS["mlp4"]()

        def solve(params):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(vf), diffrax_deer.DEER(num_points=T + 1, mesh=mesh), 0.0,
                T1, T1, y0, args=params, saveat=diffrax.SaveAt(ts=SAVE, solver_state=True),
            )

        loss = lambda p: jnp.sum(solve(p).ys ** 2)  # type: ignore  # noqa: E731
        iters = lambda p: solve(p).solver_state.total_iters  # type: ignore  # noqa: E731
        return loss, params, iters
    cell = eqx.nn.GRUCell(4, 8, key=jax.random.PRNGKey(0), dtype=jnp.float64)
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    xs = jax.random.normal(jax.random.PRNGKey(1), (T, 4))

    def scan(params):
        cell = eqx.combine(params, static)
        step = lambda h, x: (cell(x, h), cell(x, h))  # noqa: E731
        return diffrax_deer.scan(step, jnp.zeros(8), xs, mesh=mesh, return_stats=True)

    loss = lambda p: jnp.sum(scan(p)[1] ** 2)  # noqa: E731
    return loss, params, lambda p: scan(p)[2].num_iters


def _phases(T: int, D: int, mesh):
    """Seconds of one linear recurrence of shape `(T, D, D)` and of the exchange alone."""
    import jax
    import jax.numpy as jnp

    import diffrax_deer

    from . import _common as common

    A = 0.5 * jax.random.normal(jax.random.PRNGKey(2), (T, D, D)) / D
    b = jnp.ones((T, D))
    scan = jax.jit(lambda A, b: diffrax_deer.linear_recurrence(A, b, mesh=mesh))
    scan_s = common.time_call(scan, A, b, repeats=10).min_s
    if mesh is None:
        return scan_s, 0.0
    from diffrax_deer._linear_recurrence import _combine
    from diffrax_deer._sharding import time_sharding

    sharding = time_sharding(mesh, None, "bench")
    assert sharding is not None
    P = sharding.num_shards

    def exchange(M, c):
        def local(slices, _):
            M, c = slices
            (M, c), _ = sharding.exclusive_prefix(_combine, (M[0], c[0]), reverse=False)
            return c[None]

        return sharding.map(local, (M, c))

    M, c = jnp.ones((P, D, D)) / D, jnp.ones((P, D))
    exchange_s = common.time_call(jax.jit(exchange), M, c, repeats=20).min_s
    return scan_s, exchange_s


def _measure_one(name: str, T: int, devices: int) -> dict:
    import jax

    from . import _common as common

    common.enable_float64()
    assert jax.device_count() == devices, jax.devices()
    mesh = jax.make_mesh((devices,), ("time",)) if devices > 1 else None
    loss, params, iters = _workload(name, T, mesh)
    forward = common.compile_jitted(loss, params)
    grad = common.compile_jitted(jax.grad(loss), params)
    row = dict(
        workload=name, devices=devices, T=T, compile_s=forward.compile_s,
        grad_compile_s=grad.compile_s, memory_bytes=grad.memory_bytes,
        forward_s=common.time_call(forward.fn, params).min_s,
        grad_s=common.time_call(grad.fn, params).min_s,
        newton_iters=int(jax.jit(iters)(params)),
    )
    row["scan_s"], row["exchange_s"] = _phases(T, 4 if name == "node" else 8, mesh)
    return row


def _in_subprocess(name: str, T: int, devices: int, one_core: bool = False) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "benchmarks.bench_sharding", "--one", name, str(T),
               str(devices)]
    if one_core:  # (Linux) the process pinned to one core
        command = ["taskset", "-c", "0", *command]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["cores"] = 1 if one_core else os.cpu_count()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=100_000, help="grid of the strong scaling")
    parser.add_argument("--devices", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--workloads", nargs="*", default=["node", "gru"])
    parser.add_argument("--rounds", type=int, default=3,
                        help="fresh processes per case, alternating; times: min over them")
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD", "T", "DEVICES"),
                        help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        name, T, devices = opts.one
        print(json.dumps(_measure_one(name, int(T), int(devices))))
        return
    from . import _common as common

    rows = []
    for name in opts.workloads:
        cases = {(opts.T, P) for P in opts.devices}  # strong
        cases |= {(opts.T * P // max(opts.devices), P) for P in opts.devices}  # weak
        # One device on one core: what one device's own threads add.
        cases.add((opts.T, 0))
        measured = {}
        for _ in range(opts.rounds):  # alternating, against this machine's drift
            for T, P in sorted(cases):
                row = _in_subprocess(name, T, max(P, 1), one_core=P == 0)
                common.log(f"{name} T={T} P={P}: {row}")
                best = measured.setdefault((T, P), row)
                for key in ("forward_s", "grad_s", "scan_s", "exchange_s", "compile_s",
                            "grad_compile_s"):
                    best[key] = min(best[key], row[key])
        for (T, P), row in sorted(measured.items()):
            strong, weak = measured.get((T, 1)), measured.get((T // max(P, 1), 1))
            for fn in ("forward", "grad"):
                ok = P > 1 and strong is not None
                row[f"strong_{fn}"] = strong[f"{fn}_s"] / row[f"{fn}_s"] if ok else None
                ok = P > 1 and weak is not None
                row[f"weak_{fn}"] = weak[f"{fn}_s"] / row[f"{fn}_s"] if ok else None
            row["bytes_per_point"] = row["memory_bytes"] / T
            row["max_T"] = int(BUDGET_BYTES / row["bytes_per_point"])
            rows.append(row)
    t, x = common.fmt_time, common.fmt_bytes
    ratio = lambda v: "–" if v is None else common.fmt_ratio(v)  # noqa: E731
    columns = [
        common.Column("workload", "workload"), common.Column("T", "T"),
        common.Column("devices", "devices"), common.Column("cores", "cores"),
        common.Column("newton_iters", "Newton it."),
        common.Column("forward_s", "forward", t),
        common.Column("strong_forward", "speed-up (strong)", ratio),
        common.Column("weak_forward", "weak eff.", ratio),
        common.Column("grad_s", "gradient", t),
        common.Column("strong_grad", "speed-up (strong)", ratio),
        common.Column("weak_grad", "weak eff.", ratio),
        common.Column("scan_s", "one scan", t),
        common.Column("exchange_s", "exchange", t),
        common.Column("grad_compile_s", "compile grad", t),
        common.Column("memory_bytes", "grad memory / device", x),
        common.Column("max_T", "grid in 1 GiB / device", "{:,}"),
    ]
    section = common.Section(
        "Strong and weak scaling over host devices", columns, rows,
        "Speed-up (strong): the 1-device time of the same T over this row's. Weak "
        "efficiency: the 1-device time of T / P (the same work per device) over this "
        "row's (1 is perfect). `one scan`: one `linear_recurrence` of the solve's shape "
        "`(T, D, D)`; `exchange`: the all-gather of the P aggregate maps and the prefix "
        "over devices alone. Memory: XLA's per-device estimate for the compiled "
        "gradient (arguments + outputs + temporaries); the last column extrapolates it "
        "linearly to a 1 GiB per-device budget.",
    )
    paths = common.write_results(
        "sharding", [section], title="Sequence parallelism over host devices",
        config=dict(T=opts.T, devices=opts.devices, workloads=opts.workloads),
    )
    common.log(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
