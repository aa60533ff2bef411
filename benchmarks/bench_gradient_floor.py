"""What an exact reverse-mode gradient through `DEER()` cannot avoid, next to what it costs.

Two measurements behind the limits in the README ("Training through the solver"):

1. **The floor of an exact reverse pass of the exponential scheme.** The converged
   trajectory $y$ is the root of the scheme's residual, which is built from the vector
   field's Jacobians $J_k$ on the grid (its matrix exponentials). The implicit
   derivative needs the residual's exact transpose at $y$: that is, the Jacobians at
   $y$ (one batched Jacobian of the vector field over the grid), and the pull-back of a
   dense cotangent through them (a second derivative of the vector field: $D$
   forward-over-reverse directions per grid point, `_jacobian.py`). The forward solve
   of a converged easy problem is about one Newton iteration on the fine grid, itself
   one Jacobian and one scan. So

   $$\\frac{\\text{gradient}}{\\text{forward}} \\ \\ge\\ \\frac{\\text{forward} +
   \\text{Jacobian} + \\text{second-order pass}}{\\text{forward}},$$

   and this script measures the three terms (each compiled alone, at values near the
   trajectory: none of them has data-dependent control flow) next to the `DirectAdjoint`
   gradient of `bench_training`'s loss.

2. **Saved times inside one window.** diffrax evaluates `SaveAt(ts=...)` in a loop over
   the saved times of each step, whose reverse pass adds each saved time's cotangent of
   the step's dense output (here the window's `(T, D)` grid values and slopes) to a
   running sum. Under `RecursiveCheckpointAdjoint` XLA updates that sum in place, since
   the dense output reads each array through one slice (`_interpolation._pair`):
   $O(D)$ per saved time. Under `DirectAdjoint` (diffrax's bounded loop: each step of
   the save loop inside a `lax.cond`, run for the saved times rounded up to a power of
   16) it writes the whole array per step: $O(\\text{saves} \\times T D)$ work that
   the forward pass does not have. Measured as the gradient against the number of saved
   times.

    .venv/bin/python -m benchmarks.bench_gradient_floor

Results: `benchmarks/results/gradient_floor_<platform>_py<X.Y>.{json,md}`.
"""

from __future__ import annotations

import argparse

from . import _common as common


common.enable_float64()

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import diffrax_deer  # noqa: E402
from diffrax_deer._discretisation import ExponentialTrapezoid  # noqa: E402
from diffrax_deer._jacobian import value_and_jacobian  # noqa: E402
from diffrax_deer._misc import TreeFlattener  # noqa: E402

from . import bench_training as training  # noqa: E402


def _time(fn, *args, repeats):
    compiled = common.compile_jitted(fn, *args)
    return common.time_call(compiled.fn, *args, repeats=repeats).min_s


def _floor_row(key, T, repeats):
    name, vf, y0, params = training.MODELS[key]()
    flattener = TreeFlattener(y0)
    D = flattener.size

    def scheme(p):
        return ExponentialTrapezoid().window(
            terms=diffrax.ODETerm(vf), args=p, t0=jnp.array(0.0), t1=jnp.array(training.T1),
            y0=flattener.ravel(y0), flattener=flattener, num_points=T, jacobian="dense",
            time_sharding=None,
        )

    def jacobians(p, ys):
        problem = scheme(p)
        return value_and_jacobian(problem._increment, problem.ts, ys, "dense")[1]

    # Values near the initial state: the vector fields here have no data-dependent
    # control flow, so their cost does not depend on where they are evaluated.
    ys = flattener.ravel(y0) + 0.01 * jr.normal(jr.PRNGKey(0), (T, D))
    cotangent = jr.normal(jr.PRNGKey(1), (T, D, D))

    def second_order(p, ys):
        pull = lambda p, ys: jnp.sum(jacobians(p, ys) * cotangent)
        return jax.grad(pull, argnums=(0, 1))(p, ys)

    fns = training._loss_fns(vf, y0, diffrax_deer.DEER(num_points=T), training.T1)
    row = dict(model=name, D=D, T=T)
    row["forward_s"] = _time(fns["forward"], params, repeats=repeats)
    row["grad_direct_s"] = _time(fns["grad_direct"], params, repeats=repeats)
    row["jacobian_s"] = _time(jacobians, params, ys, repeats=repeats)
    row["second_order_s"] = _time(second_order, params, ys, repeats=repeats)
    row["grad_ratio"] = row["grad_direct_s"] / row["forward_s"]
    row["floor_ratio"] = (row["forward_s"] + row["jacobian_s"] + row["second_order_s"]) / row["forward_s"]
    common.log(
        f"{name} T={T}: forward {common.fmt_time(row['forward_s'])}, Direct grad "
        f"{row['grad_ratio']:.2f}x, floor {row['floor_ratio']:.2f}x"
    )
    return row


def _saves_rows(key, T, saves, repeats):
    name, vf, y0, params = training.MODELS[key]()
    rows = []
    for num in saves:
        saveat = diffrax.SaveAt(ts=jnp.linspace(0.0, training.T1, num)) if num > 1 else diffrax.SaveAt(t1=True)

        def loss(p, adjoint, saveat=saveat):
            sol = training._solve(
                vf, y0, p, diffrax_deer.DEER(num_points=T), training.T1, saveat=saveat,
                adjoint=adjoint, max_steps=4,
            )
            return jnp.sum(sol.ys**2)

        rc = lambda p: loss(p, diffrax.RecursiveCheckpointAdjoint())
        direct = lambda p: loss(p, diffrax.DirectAdjoint())
        row = dict(model=name, T=T, saves=num)
        row["forward_s"] = _time(rc, params, repeats=repeats)
        row["grad_rc_s"] = _time(jax.grad(rc), params, repeats=repeats)
        row["grad_direct_s"] = _time(jax.grad(direct), params, repeats=repeats)
        row["grad_rc_ratio"] = row["grad_rc_s"] / row["forward_s"]
        row["grad_direct_ratio"] = row["grad_direct_s"] / row["forward_s"]
        common.log(f"{name} T={T} saves={num}: RC {row['grad_rc_ratio']:.2f}x, Direct {row['grad_direct_ratio']:.2f}x")
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=int, nargs="*", default=[1_000, 10_000])
    parser.add_argument("--models", nargs="*", default=["mlp4", "mlp16", "hnn8", "vdp"])
    parser.add_argument("--saves", type=int, nargs="*", default=[1, 10, 50, 200])
    parser.add_argument("--saves-models", nargs="*", default=["vdp", "mlp4"])
    parser.add_argument("--saves-grid", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=9)
    opts = parser.parse_args()
    floor = [_floor_row(key, T, opts.repeats) for key in opts.models for T in opts.grids]
    saves = [
        row for key in opts.saves_models
        for row in _saves_rows(key, opts.saves_grid, opts.saves, opts.repeats)
    ]
    t, r = common.fmt_time, common.fmt_ratio
    sections = [
        common.Section(
            "The floor of an exact reverse pass (exponential scheme, one window)",
            [
                common.Column("model", "model"), common.Column("D", "D"),
                common.Column("T", "points"),
                common.Column("forward_s", "forward", t),
                common.Column("grad_direct_s", "grad (Direct)", t),
                common.Column("grad_ratio", "/ fwd", r),
                common.Column("jacobian_s", "one Jacobian on the grid", t),
                common.Column("second_order_s", "exact second-order pass", t),
                common.Column("floor_ratio", "(fwd + Jacobian + second order) / fwd", r),
            ],
            floor,
            "`bench_training`'s loss (sum of squares at 50 saved times over [0, 5]). The "
            "last column is the least an exact reverse-mode gradient can cost against the "
            "forward solve: it must evaluate the vector field's Jacobians at the solution "
            "and pull a dense cotangent back through them (second derivatives, D "
            "directions per point); the scan, the exponentials and diffrax's loops come on "
            "top.",
        ),
        common.Section(
            "Gradient against the number of saved times in one window",
            [
                common.Column("model", "model"), common.Column("T", "points"),
                common.Column("saves", "saved times"),
                common.Column("forward_s", "forward", t),
                common.Column("grad_rc_s", "grad (RecursiveCheckpoint)", t),
                common.Column("grad_rc_ratio", "/ fwd", r),
                common.Column("grad_direct_s", "grad (Direct)", t),
                common.Column("grad_direct_ratio", "/ fwd", r),
            ],
            saves,
            "Loss = sum of squares of `SaveAt(ts=linspace(0, 5, saves))` (1: `SaveAt(t1=True)`). "
            "The reverse pass of diffrax's save loop adds each saved time's cotangent of the "
            "window's dense output to a running sum: in place under RecursiveCheckpoint, "
            "the whole `(T, D)` arrays per step of the loop under Direct (see the module doc).",
        ),
    ]
    paths = common.write_results(
        "gradient_floor", sections, title="What an exact gradient through DEER cannot avoid",
        config=dict(grids=opts.grids, models=opts.models, saves=opts.saves,
                    saves_models=opts.saves_models, saves_grid=opts.saves_grid,
                    repeats=opts.repeats),
    )
    common.log(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
