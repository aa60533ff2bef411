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

    .venv/bin/python -m benchmarks.bench_scan --quick    # ~3 minutes on a 2-core CPU
    .venv/bin/python -m benchmarks.bench_scan            # hidden 1/8/64, T up to 1e5
    .venv/bin/python -m benchmarks.bench_scan --hidden 8 --T 1000 100000 --batch 4

Results: `benchmarks/results/scan[_quick]_<platform>_py<X.Y>.{json,md}`.
"""

from __future__ import annotations

import argparse
import os


from . import _common as common


import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import diffrax_deer


INPUT_SIZE = 4
# "quasi-deer+diag": quasi-DEER given the GRU's Jacobian diagonal in closed form
# (`jacobian_diagonal=diffrax_deer.gru_jacobian_diagonal(cell)`), one cell evaluation
# instead of D Jacobian-vector products.
METHODS = ("deer", "quasi-deer", "quasi-deer+diag")


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
                jacobian_diagonal=diffrax_deer.gru_jacobian_diagonal(cell),
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
    available = common.available_ram_bytes()
    return memory is None or available is None or memory < budget_fraction * available


def _error(out, ref, mode) -> float:
    """Forward: max-abs difference of the outputs; gradients: the largest max-abs
    difference of a weight array relative to its largest entry."""
    if mode == "forward":
        return float(jnp.max(jnp.abs(out[0] - ref[0])))
    g, g_ref = eqx.filter(out[1], eqx.is_array), eqx.filter(ref[1], eqx.is_array)
    return max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-300))
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref))
    )


def run_case(hidden, T, batch, repeats, max_total_s, mode, methods, skip_above):
    cell, h0, xs = make_problem(hidden, T, batch)
    make = forward_fn if mode == "forward" else grad_fn
    base = common.compile_jitted(make("lax"), cell, h0, xs)
    lax_timing = common.time_call(base.fn, cell, h0, xs, repeats=repeats, max_total_s=max_total_s)
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
            common.log(f"  {method:10s} skipped (T*D^2 > {skip_above:.0e})")
            continue
        try:
            compiled = common.compile_jitted(make(method), cell, h0, xs)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while compiling
            row["note"] = f"compile failed: {type(e).__name__}"
            rows.append(row)
            continue
        row.update(compile_s=compiled.compile_s, mem=compiled.memory_bytes)
        if not _fits(compiled.memory_bytes):
            row["note"] = f"skipped: needs {common.fmt_bytes(compiled.memory_bytes)}"
            rows.append(row)
            common.log(f"  {method:10s} skipped ({row['note']})")
            continue
        timing = common.time_call(
            compiled.fn, cell, h0, xs, repeats=repeats, max_total_s=max_total_s
        )
        out = timing.output
        iters = out[-1]
        err = _error(out, ref, mode)
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
        common.log(
            f"  {method:10s} {common.fmt_time(timing.min_s):>9s} (lax {common.fmt_time(lax_timing.min_s)}) "
            f"iters max {row['iters_max']} mean {row['iters_mean']:.1f}  err {err:.1e}  "
            f"mem {common.fmt_bytes(compiled.memory_bytes)} (lax {common.fmt_bytes(base.memory_bytes)})  "
            f"compile {compiled.compile_s:.1f} s"
        )
    return rows


COLUMNS = [
    common.Column("hidden", "hidden D"),
    common.Column("T", "T", lambda t: f"{t:.0e}"),
    common.Column("batch", "batch"),
    common.METHOD,
    common.Column("iters_max", "Newton it. (max)"),
    common.Column("iters_mean", "it. (mean)", "{:.1f}"),
    common.Column("time_s", "scan", common.fmt_time),
    common.Column("lax_s", "lax.scan", common.fmt_time),
    common.Column("speedup", "lax/scan", common.fmt_ratio),
    common.Column("mem", "scan mem", common.fmt_bytes),
    common.Column("lax_mem", "lax mem", common.fmt_bytes),
    common.MAX_ERR,
    common.COMPILE,
    common.Column("note", "note"),
]


GRAD_COLUMNS = [
    common.Column("per_forward", "scan / forward", common.fmt_ratio),
    common.Column("lax_per_forward", "lax.scan / forward", common.fmt_ratio),
]


def _per_forward(grad_rows, forward_rows):
    """Each training step's time against its forward evaluation's (same hidden size,
    length, batch and method), for both scans."""
    key = lambda row: (row["hidden"], row["T"], row["batch"], row["method"])
    forward = {key(row): row for row in forward_rows}
    for row in grad_rows:
        fwd = forward.get(key(row))
        for name, column in (("time_s", "per_forward"), ("lax_s", "lax_per_forward")):
            if fwd is not None and row.get(name) and fwd.get(name):
                row[column] = row[name] / fwd[name]
    return grad_rows


def _options():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, few repeats")
    parser.add_argument("--hidden", type=int, nargs="+", default=None)
    parser.add_argument("--T", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None, help="default: by size")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--grad", action="store_true", help="also time value_and_grad")
    args = parser.parse_args()
    args.hidden = args.hidden or [1, 8, 64]
    args.T = args.T or [1_000, 10_000, 100_000]
    if args.quick:
        args.repeats = args.repeats or 3
        args.max_total_s = 3.0
        # T * D^2 above this: a call of deer / quasi-deer takes > ~5 s on this CPU.
        args.skip_above = 1e7
        args.grad_cases = [(8, 1_000)]
    else:
        args.repeats = args.repeats or 5
        args.max_total_s = 20.0
        args.skip_above = None
        args.grad_cases = [(h, t) for h in args.hidden for t in args.T if h * h * t <= 1e7]
    if not (args.grad or args.quick):
        args.grad_cases = []
    return args


def _sections(forward_rows, grad_rows):
    sections = [
        common.Section(
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
            common.Section(
                "Training step: value_and_grad w.r.t. the GRU's weights",
                COLUMNS[:-1] + GRAD_COLUMNS + COLUMNS[-1:],
                grad_rows,
                description=(
                    "`eqx.filter_value_and_grad` of `mean(ys**2)` with respect to the "
                    "cell; gradients by implicit differentiation (one transposed scan "
                    "for deer; exact-JVP refinement for quasi-deer). max err: max over "
                    "the weight arrays of the max-abs gradient difference relative to "
                    "the largest entry of `jax.lax.scan`'s gradient. / forward: the "
                    "training step's time against the forward evaluation's of the same "
                    "row in the table above (same run), for diffrax_deer.scan and for "
                    "`jax.lax.scan`."
                ),
            )
        )
    return sections


def _notes(load_start):
    load_end = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    competing = (
        ": other processes were competing for the CPU, so absolute times may be inflated."
        if load_start > 0.5
        else "."
    )
    return [
        "CPU with 2 cores: the parallel scan has almost no parallel hardware to use, so "
        "this measures the work of the parallel methods (several Newton iterations, "
        "each a batched Jacobian plus a linear scan) against a tight sequential loop; "
        "the DEER paper's speed-ups are on GPUs.",
        f"1-minute load average {load_start:.2f} just before the run (other "
        f"processes) and {load_end:.2f} at its end (this benchmark included), on "
        f"{cores} usable cores" + competing,
    ]


def _run_cases(args, cases, mode):
    rows = []
    for hidden, T in cases:
        batch = args.batch or default_batch(hidden, T)
        common.log(f"{mode}: GRU hidden {hidden}, T {T:.0e}, batch {batch}")
        rows += run_case(
            hidden, T, batch, args.repeats, args.max_total_s, mode, args.methods,
            args.skip_above,
        )
    return rows


def main():
    args = _options()
    common.log(common.describe_machine())
    load_start = os.getloadavg()[0]
    forward_rows = _run_cases(args, [(h, T) for h in args.hidden for T in args.T], "forward")
    grad_rows = _per_forward(_run_cases(args, args.grad_cases, "grad"), forward_rows)
    name = "scan_quick" if args.quick else "scan"
    json_path, md_path = common.write_results(
        name,
        _sections(forward_rows, grad_rows),
        title="diffrax_deer.scan vs jax.lax.scan (GRU)",
        config=dict(
            hidden=args.hidden, T=args.T, input_size=INPUT_SIZE, repeats=args.repeats,
            methods=list(args.methods), batch=args.batch or "by size",
            skip_dense_above_TD2=args.skip_above,
        ),
        notes=_notes(load_start),
    )
    common.log(f"wrote {json_path} and {md_path}")

if __name__ == "__main__":
    main()
