"""`diffrax_deer.scan` against `jax.lax.scan` on a randomly initialised equinox GRU.

The DEER paper's headline benchmark (and the reference repository's protocol): a GRU
cell `equinox.nn.GRUCell(input_size, hidden)` with random weights, random inputs
`xs ~ N(0, 1)`, zero initial state, evaluated over a batch of sequences with `jax.vmap`;
warm-up call, `jax.block_until_ready`, several repeats. Per case it records

- Newton iterations (max and mean over the batch: under `vmap` every member iterates
  until the slowest converges, so the max is what the time pays for);
- steady-state wall time of `diffrax_deer.scan` (`deer`, `quasi-deer`, and
  `quasi-deer` given the GRU's Jacobian diagonal in closed form through
  `jacobian_diagonal=`) and of the same function with `jax.lax.scan`, and their ratio;
- XLA's memory estimate of one compiled call (arguments + outputs + temporaries), and
  the compile time;
- the max-abs difference of the outputs from `jax.lax.scan`'s.

Optionally (`--grad`; always one small case in `--quick`) the same for one
`value_and_grad` of a loss on the outputs with respect to the cell's weights (training).
`--quick` skips deer / quasi-deer where T * D^2 > 1e7 (seconds per call here).

    .venv/bin/python benchmarks/bench_scan.py --quick    # ~3 minutes on a 2-core CPU
    .venv/bin/python benchmarks/bench_scan.py            # hidden 1/8/64, T up to 1e5
    .venv/bin/python benchmarks/bench_scan.py --hidden 8 --T 1000 100000 --batch 4

Results: `benchmarks/results/scan[_quick]_<platform>_py<X.Y>.{json,md}`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    available_ram_bytes,
    Column,
    compile_jitted,
    describe_machine,
    enable_float64,
    fmt_bytes,
    fmt_ratio,
    fmt_sci,
    fmt_time,
    log,
    Section,
    time_call,
    write_results,
)


enable_float64()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import diffrax_deer  # noqa: E402


INPUT_SIZE = 4
# "quasi-deer+diag": quasi-DEER given the GRU's Jacobian diagonal in closed form
# (`jacobian_diagonal=`), one cell evaluation instead of D Jacobian-vector products.
METHODS = ("deer", "quasi-deer", "quasi-deer+diag")


def gru_jacobian_diagonal(cell: eqx.nn.GRUCell, h, x):
    """Diagonal of d cell(x, h) / dh for `equinox.nn.GRUCell`, in closed form:
    with h' = n + z (h - n), dh'_i/dh_i = (1 - z_i) dn_i + z_i + (h_i - n_i) dz_i."""
    d = cell.hidden_size
    ig = jnp.split(cell.weight_ih @ x + cell.bias, 3)
    hg = jnp.split(cell.weight_hh @ h, 3)
    w = cell.weight_hh
    idx = jnp.arange(d)
    w_r, w_z, w_n = w[idx, idx], w[d + idx, idx], w[2 * d + idx, idx]
    r = jax.nn.sigmoid(ig[0] + hg[0])
    z = jax.nn.sigmoid(ig[1] + hg[1])
    pre = hg[2] + cell.bias_n
    n = jnp.tanh(ig[2] + r * pre)
    dr = r * (1 - r) * w_r
    dz = z * (1 - z) * w_z
    dn = (1 - n**2) * (r * w_n + pre * dr)
    return (1 - z) * dn + z + (h - n) * dz


def default_batch(hidden: int, T: int) -> int:
    """16 sequences (the reference's protocol) where that stays small, fewer for the
    largest cases so that a dense (T, D, D) Jacobian per member still fits."""
    work = hidden * hidden * T
    if work <= 1e6:
        return 16
    if work <= 1e7:
        return 4
    return 1


def make_problem(hidden: int, T: int, batch: int, seed: int = 0):
    kcell, kx = jr.split(jr.PRNGKey(seed))
    cell = eqx.nn.GRUCell(INPUT_SIZE, hidden, key=kcell)
    xs = jr.normal(kx, (batch, T, INPUT_SIZE))
    h0 = jnp.zeros((batch, hidden))
    return cell, h0, xs


def forward_fn(method: str):
    """`(cell, h0, xs) -> (ys, num_iters)` batched over the leading axis of h0/xs."""

    def one(cell, h0, xs):
        def step(h, x):
            h = cell(x, h)
            return h, h

        if method == "lax":
            _, ys = jax.lax.scan(step, h0, xs)
            return ys, jnp.array(0, jnp.int32)
        if method == "quasi-deer+diag":
            kwargs = dict(
                method="quasi-deer",
                jacobian_diagonal=lambda h, x: gru_jacobian_diagonal(cell, h, x),
            )
        else:
            kwargs = dict(method=method)
        _, ys, stats = diffrax_deer.scan(step, h0, xs, return_stats=True, **kwargs)
        return ys, stats.num_iters

    def batched(cell, h0, xs):
        return jax.vmap(one, in_axes=(None, 0, 0))(cell, h0, xs)

    return batched


def grad_fn(method: str):
    forward = forward_fn(method)

    def loss(cell, h0, xs):
        ys, iters = forward(cell, h0, xs)
        return jnp.mean(ys**2), iters

    def value_and_grad(cell, h0, xs):
        (value, iters), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            cell, h0, xs
        )
        return value, grads, iters

    return value_and_grad


def _fits(memory: int | None, budget_fraction: float = 0.6) -> bool:
    available = available_ram_bytes()
    return memory is None or available is None or memory < budget_fraction * available


def run_case(hidden, T, batch, repeats, max_total_s, mode, methods, skip_above):
    cell, h0, xs = make_problem(hidden, T, batch)
    make = forward_fn if mode == "forward" else grad_fn
    base = compile_jitted(make("lax"), cell, h0, xs)
    lax_timing = time_call(base.fn, cell, h0, xs, repeats=repeats, max_total_s=max_total_s)
    ref = lax_timing.output
    rows = []
    for method in methods:
        row = dict(
            hidden=hidden, T=T, batch=batch, method=method, mode=mode,
            lax_s=lax_timing.min_s, lax_median_s=lax_timing.median_s,
            lax_mem=base.memory_bytes, lax_compile_s=base.compile_s,
        )
        # Both methods that differentiate the cell for their Jacobian cost O(T D^3)
        # per iteration (dense Jacobian, or D Jacobian-vector products).
        expensive = method in ("deer", "quasi-deer") and hidden > 1
        if skip_above is not None and expensive and hidden * hidden * T > skip_above:
            row["note"] = f"skipped: T*D^2 > {skip_above:.0e}"
            rows.append(row)
            log(f"  {method:10s} skipped (T*D^2 > {skip_above:.0e})")
            continue
        try:
            compiled = compile_jitted(make(method), cell, h0, xs)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while compiling
            row["note"] = f"compile failed: {type(e).__name__}"
            rows.append(row)
            continue
        row.update(compile_s=compiled.compile_s, mem=compiled.memory_bytes)
        if not _fits(compiled.memory_bytes):
            row["note"] = f"skipped: needs {fmt_bytes(compiled.memory_bytes)}"
            rows.append(row)
            log(f"  {method:10s} skipped ({row['note']})")
            continue
        timing = time_call(
            compiled.fn, cell, h0, xs, repeats=repeats, max_total_s=max_total_s
        )
        out = timing.output
        iters = out[-1]
        if mode == "forward":
            err = float(jnp.max(jnp.abs(out[0] - ref[0])))
        else:
            g, g_ref = eqx.filter(out[1], eqx.is_array), eqx.filter(ref[1], eqx.is_array)
            err = max(
                float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-300))
                for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref))
            )
        row.update(
            time_s=timing.min_s,
            median_s=timing.median_s,
            repeats=timing.repeats,
            iters_max=int(jnp.max(iters)),
            iters_mean=float(jnp.mean(iters)),
            err=err,
            speedup=lax_timing.min_s / timing.min_s,
        )
        rows.append(row)
        log(
            f"  {method:10s} {fmt_time(timing.min_s):>9s} (lax {fmt_time(lax_timing.min_s)}) "
            f"iters max {row['iters_max']} mean {row['iters_mean']:.1f}  err {err:.1e}  "
            f"mem {fmt_bytes(compiled.memory_bytes)} (lax {fmt_bytes(base.memory_bytes)})  "
            f"compile {compiled.compile_s:.1f} s"
        )
    return rows


COLUMNS = [
    Column("hidden", "hidden D"),
    Column("T", "T", lambda t: f"{t:.0e}"),
    Column("batch", "batch"),
    Column("method", "method"),
    Column("iters_max", "Newton it. (max)"),
    Column("iters_mean", "it. (mean)", "{:.1f}"),
    Column("time_s", "scan", fmt_time),
    Column("lax_s", "lax.scan", fmt_time),
    Column("speedup", "lax/scan", fmt_ratio),
    Column("mem", "scan mem", fmt_bytes),
    Column("lax_mem", "lax mem", fmt_bytes),
    Column("err", "max err", fmt_sci),
    Column("compile_s", "compile", fmt_time),
    Column("note", "note"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, few repeats")
    parser.add_argument("--hidden", type=int, nargs="+", default=None)
    parser.add_argument("--T", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None, help="default: by size")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--grad", action="store_true", help="also time value_and_grad")
    args = parser.parse_args()

    if args.quick:
        hiddens = args.hidden or [1, 8, 64]
        Ts = args.T or [1_000, 10_000, 100_000]
        repeats = args.repeats or 3
        max_total_s = 3.0
        # T * D^2 above this: a call of deer / quasi-deer takes > ~5 s on this CPU.
        skip_above = 1e7
        grad_cases = [(8, 1_000)]
    else:
        hiddens = args.hidden or [1, 8, 64]
        Ts = args.T or [1_000, 10_000, 100_000]
        repeats = args.repeats or 5
        max_total_s = 20.0
        skip_above = None
        grad_cases = [(h, t) for h in hiddens for t in Ts if h * h * t <= 1e7]
    if not (args.grad or args.quick):
        grad_cases = []

    log(describe_machine())
    load_start = os.getloadavg()[0]
    forward_rows = []
    for hidden in hiddens:
        for T in Ts:
            batch = args.batch or default_batch(hidden, T)
            log(f"GRU hidden {hidden}, T {T:.0e}, batch {batch}")
            forward_rows += run_case(
                hidden, T, batch, repeats, max_total_s, "forward", args.methods,
                skip_above,
            )
    grad_rows = []
    for hidden, T in grad_cases:
        batch = args.batch or default_batch(hidden, T)
        log(f"value_and_grad: GRU hidden {hidden}, T {T:.0e}, batch {batch}")
        grad_rows += run_case(
            hidden, T, batch, repeats, max_total_s, "grad", args.methods, skip_above
        )

    sections = [
        Section(
            "Forward evaluation: GRU, diffrax_deer.scan vs jax.lax.scan",
            COLUMNS,
            forward_rows,
            description=(
                f"`equinox.nn.GRUCell({INPUT_SIZE}, D)` with random weights, "
                "`xs ~ N(0, 1)`, zero initial state, `jax.vmap` over the batch, "
                "library defaults (`rtol = atol = 1e-8`, `max_iters = 100`, initial "
                "guess = initial state). Newton it.: per batch member (max, mean); the "
                "batch iterates until its slowest member converges. Times: whole "
                "batch, min over repeats. Mem: XLA's estimate of one compiled call. "
                "max err: max-abs difference of all outputs from `jax.lax.scan`'s. "
                "lax/scan > 1 means diffrax_deer is faster."
            ),
        )
    ]
    if grad_rows:
        sections.append(
            Section(
                "Training step: value_and_grad w.r.t. the GRU's weights",
                COLUMNS,
                grad_rows,
                description=(
                    "`eqx.filter_value_and_grad` of `mean(ys**2)` with respect to the "
                    "cell; gradients by implicit differentiation (one transposed scan "
                    "for deer; exact-JVP refinement for quasi-deer). max err: max over "
                    "the weight arrays of the max-abs gradient difference relative to "
                    "the largest entry of `jax.lax.scan`'s gradient."
                ),
            )
        )
    notes = [
        "CPU with 2 cores: the parallel scan has almost no parallel hardware to use, so "
        "this measures the work of the parallel methods (several Newton iterations, "
        "each a batched Jacobian plus a linear scan) against a tight sequential loop; "
        "the DEER paper's speed-ups are on GPUs.",
    ]
    load_end = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    notes.append(
        f"1-minute load average {load_start:.2f} just before the run (other "
        f"processes) and {load_end:.2f} at its end (this benchmark included), on "
        f"{cores} usable cores"
        + (
            ": other processes were competing for the CPU, so absolute times may be "
            "inflated."
            if load_start > 0.5
            else "."
        )
    )
    name = "scan_quick" if args.quick else "scan"
    json_path, md_path = write_results(
        name,
        sections,
        title="diffrax_deer.scan vs jax.lax.scan (GRU)",
        config=dict(
            hidden=hiddens, T=Ts, input_size=INPUT_SIZE, repeats=repeats,
            methods=list(args.methods), batch=args.batch or "by size",
            skip_dense_above_TD2=skip_above,
        ),
        notes=notes,
    )
    log(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
