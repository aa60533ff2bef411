"""Demo: the Van der Pol oscillator solved with `DEER` and with `diffrax.Tsit5`.

Run with `python -m diffrax_deer.demo` (add `--help` for options). Prints accuracy,
Newton iterations and wall time for both solvers and saves a plot.
"""

import argparse
import time

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import diffrax_deer  # noqa: E402


def van_der_pol(t, y, mu):
    x, v = y
    return jnp.stack([v, mu * (1 - x**2) * v - x])


def _timed(fn, *args, repeats: int = 5):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return out, best, first - best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-points", type=int, default=100_001, help="grid points")
    parser.add_argument("--t1", type=float, default=10.0, help="end time")
    parser.add_argument("--mu", type=float, default=1.0, help="Van der Pol parameter")
    parser.add_argument("--output", default="deer_demo.png", help="plot file")
    args = parser.parse_args(argv)

    term = diffrax.ODETerm(van_der_pol)
    y0 = jnp.array([2.0, 0.0])
    t0, t1, n = 0.0, args.t1, args.num_points
    ts = jnp.linspace(t0, t1, 1001)
    saveat = diffrax.SaveAt(ts=ts, solver_state=True)

    @jax.jit
    def solve_deer(y0, mu):
        solver = diffrax_deer.DEER(num_points=n)
        return diffrax.diffeqsolve(term, solver, t0, t1, t1 - t0, y0, args=mu, saveat=saveat)

    @jax.jit
    def solve_tsit5_grid(y0, mu):
        # The same grid, stepped one point at a time.
        return diffrax.diffeqsolve(
            term, diffrax.Tsit5(), t0, t1, (t1 - t0) / (n - 1), y0, args=mu,
            saveat=diffrax.SaveAt(ts=ts), max_steps=n,
        )

    @jax.jit
    def solve_reference(y0, mu):
        return diffrax.diffeqsolve(
            term, diffrax.Tsit5(), t0, t1, 1e-3, y0, args=mu, saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
            max_steps=1_000_000,
        )

    mu = jnp.asarray(args.mu)
    print(f"Van der Pol, mu={args.mu}, t in [{t0}, {t1}], {n} grid points, "
          f"device: {jax.devices()[0].device_kind}")
    ref = solve_reference(y0, mu).ys
    sol, t_deer, c_deer = _timed(solve_deer, y0, mu)
    seq, t_seq, c_seq = _timed(solve_tsit5_grid, y0, mu)
    err_deer = float(jnp.max(jnp.abs(sol.ys - ref)))
    err_seq = float(jnp.max(jnp.abs(seq.ys - ref)))
    state = sol.solver_state
    print(f"{'solver':<28}{'max error':>12}{'wall time':>12}{'compile':>10}")
    print(f"{'DEER (parallel Newton)':<28}{err_deer:>12.2e}{t_deer * 1e3:>10.1f}ms"
          f"{c_deer:>9.1f}s")
    print(f"{'Tsit5 on the same grid':<28}{err_seq:>12.2e}{t_seq * 1e3:>10.1f}ms"
          f"{c_seq:>9.1f}s")
    print(f"DEER: {int(state.total_iters)} Newton iterations on the full grid "
          f"(+{int(state.total_coarse_iters)} on coarse grids for the initial guess), "
          f"result: {sol.result == diffrax.RESULTS.successful and 'success' or sol.result}")
    print("(DEER is a 2nd-order method: on the same grid it is less accurate than the "
          "5th-order Tsit5; its speed comes from parallel hardware -- see the README.)")

    _plot(ts, ref, sol.ys, seq.ys, args.output)

def _plot(ts, ref, ys_deer, ys_seq, output):
    """The trajectory and the errors of both solvers against the reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'diffrax_deer[demo]').")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(ts, ref[:, 0], "k", lw=3, alpha=0.3, label="reference")
    axes[0].plot(ts, ys_deer[:, 0], "C0--", label="DEER")
    axes[0].set(xlabel="t", ylabel="x(t)", title="Van der Pol trajectory")
    axes[0].legend()
    for ys, label in ((ys_deer, "DEER"), (ys_seq, "Tsit5 (same grid)")):
        error = jnp.max(jnp.abs(ys - ref), axis=1)
        axes[1].semilogy(ts, jnp.maximum(error, 1e-17), label=label)
    axes[1].set(xlabel="t", ylabel="|error|", title="error against a 1e-12 reference")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"plot saved to {output}")

if __name__ == "__main__":
    main()
