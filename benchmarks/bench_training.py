"""Training through the solver: gradient cost of `DEER` against its forward solve.

For each model and grid size T (one window of T points over the whole interval), the
loss is the sum of squares of the solution at 50 saved times, and it records:

- forward time; reverse-mode gradient time with `RecursiveCheckpointAdjoint` (diffrax's
  default) and with `DirectAdjoint` (`max_steps=4`: one window); forward-mode time
  (`jax.jvp` of the loss in one parameter direction, `diffrax.ForwardMode`); each as a
  ratio to the forward solve measured in the same run;
- first-call compile times (trace + XLA compile) of the forward solve and of the
  gradient, and XLA's memory estimate of one gradient call;
- Newton iterations on the fine grid and on the coarse grids, and the refinement steps
  of the implicit derivative's linear solve (counted in a separate, untimed call);

for the exponential scheme (`DEER()`) and a Runge--Kutta map
(`DEER(discretisation=diffrax.Tsit5())`, T/10 points: a 5th-order map needs far fewer
points for the same accuracy), next to diffrax's `Tsit5` + `PIDController` whose
tolerance gives about DEER's error at t1 (the largest of a sweep whose error is at most
DEER's).

Models: the neural ODE `MLP(D, D, 32, depth=2, tanh)(y) - 0.5 y` (D = 4, 16), the
Hamiltonian neural network of `notebooks/hamiltonian_nn.ipynb` (two bodies, D = 8,
`MLP(8, 1, 64, depth=2, softplus)`, a symplectic gradient: the vector field is itself a
gradient), and Van der Pol (mu = 1, parameter mu).

    .venv/bin/python -m benchmarks.bench_training --quick     # T in {1e3, 1e4}
    .venv/bin/python -m benchmarks.bench_training             # T up to 1e5

Results: `benchmarks/results/training[_quick]_<platform>_py<X.Y>.{json,md}`.
"""

from __future__ import annotations

import argparse

import numpy as np


from . import _common as common


import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import diffrax_deer
import diffrax_deer._implicit as _implicit


T1 = 5.0
SAVE = jnp.linspace(0.0, T1, 50)
SWEEP_TOLS = tuple(10.0 ** -np.arange(3.0, 12.01, 0.5))


def _float64(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_array(x) else x, tree)


def neural_ode(dim):
    mlp = _float64(eqx.nn.MLP(dim, dim, 32, depth=2, activation=jnp.tanh, key=jr.PRNGKey(0)))
    params, static = eqx.partition(mlp, eqx.is_inexact_array)

    def vf(t, y, params):
        return eqx.combine(params, static)(y) - 0.5 * y

    return f"mlp{dim}", vf, jr.normal(jr.PRNGKey(1), (dim,)) * 0.5, params


def hamiltonian_nn():
    mlp = _float64(eqx.nn.MLP(8, "scalar", 64, depth=2, activation=jax.nn.softplus, key=jr.PRNGKey(2)))
    params, static = eqx.partition(mlp, eqx.is_inexact_array)

    def vf(t, y, params):
        grad = jax.grad(eqx.combine(params, static))(y)
        return jnp.concatenate([grad[4:], -grad[:4]])

    q1 = jnp.array([1.0, 0.0])
    p1 = jnp.array([0.0, 0.4])
    return "hnn8", vf, jnp.concatenate([q1, -q1, p1, -p1]), params


def van_der_pol():
    def vf(t, y, mu):
        return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    return "vdp", vf, jnp.array([2.0, 0.0]), jnp.array(1.0)


MODELS = {"mlp4": lambda: neural_ode(4), "mlp16": lambda: neural_ode(16),
          "hnn8": hamiltonian_nn, "vdp": van_der_pol}


def _solve(vf, y0, params, solver, dt0, saveat=diffrax.SaveAt(ts=SAVE, t1=True), **kwargs):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(vf), solver, 0.0, T1, dt0, y0, args=params, saveat=saveat, **kwargs,
    )


def _loss_fns(vf, y0, solver, dt0, **kwargs):
    def loss(params, adjoint=diffrax.RecursiveCheckpointAdjoint(), max_steps=16):
        ys = _solve(vf, y0, params, solver, dt0, adjoint=adjoint, max_steps=max_steps, **kwargs).ys
        return jnp.sum(ys[:-1] ** 2)

    def jvp(params, tangent):
        return jax.jvp(lambda p: loss(p, diffrax.ForwardMode()), (params,), (tangent,))[1]

    return dict(
        forward=loss,
        grad_rc=jax.grad(loss),
        grad_direct=jax.grad(lambda p: loss(p, diffrax.DirectAdjoint(), max_steps=4)),
        jvp=jvp,
    )


def _count_refinements(fn, *args):
    """Vector-Jacobian products of the implicit derivative (reverse mode) in one call:
    1 = a single scan and product, no refinement."""
    counts = []
    # (The reverse pass the transpose rule calls; see `_implicit._transpose_once`.)
    transpose = _implicit._transpose_once

    def counting(*a):
        g, num_steps = transpose(*a)
        jax.debug.callback(lambda n: counts.append(int(n)), num_steps)
        return g, num_steps

    _implicit._transpose_once = counting
    # Retrace: diffrax's solve is cached by `equinox.filter_jit`.
    jax.clear_caches()
    eqx.clear_caches()
    try:
        jax.block_until_ready(jax.jit(fn)(*args))
    finally:
        _implicit._transpose_once = transpose
    return sum(counts)


def _time_all(row, fns, params, tangent, repeats, label):
    """Compiles and times each of `fns` (forward first), filling `row` with times,
    compile times, ratios to the forward solve and the gradient's memory estimate."""
    for key, fn in fns.items():
        args = (params, tangent) if key == "jvp" else (params,)
        compiled = common.compile_jitted(fn, *args)
        timing = common.time_call(compiled.fn, *args, repeats=repeats)
        row[f"{key}_s"] = timing.min_s
        row[f"{key}_compile_s"] = compiled.compile_s
        if key == "grad_rc":
            row["grad_memory"] = compiled.memory_bytes
        if key != "forward":
            row[f"{key}_ratio"] = timing.min_s / row["forward_s"]
        common.log(f"  {label} {key}: {common.fmt_time(timing.min_s)} (compile {compiled.compile_s:.1f} s)")


def _deer_case(name, vf, y0, params, label, solver, repeats):
    fns = _loss_fns(vf, y0, solver, T1)
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    row = dict(model=name, solver=label, T=solver.num_points)
    sol = jax.jit(lambda p: diffrax.diffeqsolve(
        diffrax.ODETerm(vf), solver, 0.0, T1, T1, y0, args=p,
        saveat=diffrax.SaveAt(ts=SAVE, t1=True, solver_state=True),
    ))(params)
    row["ys"] = np.asarray(sol.ys)
    row["newton"] = int(sol.solver_state.total_iters)
    row["coarse"] = int(sol.solver_state.total_coarse_iters)
    _time_all(row, fns, params, tangent, repeats, f"{name} {label} T={solver.num_points}")
    row["refinements"] = _count_refinements(fns["grad_rc"], params)
    return row


def _reference(vf, y0, params):
    sol = _solve(vf, y0, params, diffrax.Dopri8(), 0.01,
                 stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
                 max_steps=200_000)
    return sol.ys


def _tsit5_case(name, vf, y0, params, target_err, ref, repeats):
    def solve(params, tol, adjoint=diffrax.RecursiveCheckpointAdjoint()):
        return _solve(vf, y0, params, diffrax.Tsit5(), 0.01, adjoint=adjoint,
                      stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                      max_steps=100_000).ys

    sweep = jax.jit(solve)
    tol = SWEEP_TOLS[-1]
    for candidate in SWEEP_TOLS:
        err = float(jnp.max(jnp.abs(sweep(params, candidate) - ref)))
        if err <= target_err:
            tol = candidate
            break
    loss = lambda p: jnp.sum(solve(p, tol)[:-1] ** 2)
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    fns = dict(
        forward=loss,
        grad_rc=jax.grad(loss),
        jvp=lambda p, v: jax.jvp(lambda q: jnp.sum(solve(q, tol, diffrax.ForwardMode())[:-1] ** 2), (p,), (v,))[1],
    )
    row = dict(model=name, solver=f"Tsit5+PID({tol:.0e})", T=None)
    _time_all(row, fns, params, tangent, repeats, f"{name} Tsit5 tol {tol:.0e}")
    row["error"] = float(jnp.max(jnp.abs(sweep(params, tol) - ref)))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T in {1e3, 1e4}")
    parser.add_argument("--grids", type=int, nargs="*")
    parser.add_argument("--models", nargs="*", default=["mlp4", "mlp16", "hnn8", "vdp"])
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    grids = opts.grids or ([1_000, 10_000] if opts.quick else [1_000, 10_000, 100_000])
    rows = []
    for key in opts.models:
        name, vf, y0, params = MODELS[key]()
        ref = _reference(vf, y0, params)
        for T in grids:
            common.log(f"{name}, T = {T}")
            deer = _deer_case(name, vf, y0, params, "DEER", diffrax_deer.DEER(num_points=T), opts.repeats)
            deer["error"] = float(jnp.max(jnp.abs(deer.pop("ys") - ref)))
            rk = _deer_case(name, vf, y0, params, "DEER-Tsit5",
                            diffrax_deer.DEER(num_points=T // 10 + 1, discretisation=diffrax.Tsit5()),
                            opts.repeats)
            rk["error"] = float(jnp.max(jnp.abs(rk.pop("ys") - ref)))
            tsit5 = _tsit5_case(name, vf, y0, params, deer["error"], ref, opts.repeats)
            rows += [deer, rk, tsit5]
    columns = [
        common.Column("model", "model"), common.Column("solver", "solver"), common.Column("T", "points"),
        common.Column("error", "error", common.fmt_sci),
        common.Column("forward_s", "forward", common.fmt_time),
        common.Column("grad_rc_s", "grad (RecursiveCheckpoint)", common.fmt_time),
        common.Column("grad_rc_ratio", "/ fwd", common.fmt_ratio),
        common.Column("grad_direct_s", "grad (Direct)", common.fmt_time),
        common.Column("grad_direct_ratio", "/ fwd", common.fmt_ratio),
        common.Column("jvp_s", "jvp (ForwardMode)", common.fmt_time),
        common.Column("jvp_ratio", "/ fwd", common.fmt_ratio),
        common.Column("forward_compile_s", "compile fwd", common.fmt_time),
        common.Column("grad_rc_compile_s", "compile grad", common.fmt_time),
        common.Column("grad_memory", "grad memory", common.fmt_bytes),
        common.Column("newton", "Newton it."), common.Column("coarse", "coarse it."),
        common.Column("refinements", "refinements"),
    ]
    section = common.Section(
        "Gradient and forward-mode cost against the forward solve", columns, rows,
        "One window over [0, 5]; loss = sum of squares at 50 saved times. Ratios are "
        "against the forward solve of the same row, measured in the same run. "
        "`refinements`: vector-Jacobian products of the implicit derivative in one "
        "reverse-mode gradient (1 = a single scan and product, no refinement).",
    )
    name = "training_quick" if opts.quick else "training"
    paths = common.write_results(name, [section], title="Training through the solver",
                          config=dict(grids=grids, models=opts.models))
    common.log(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
