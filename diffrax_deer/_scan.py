r"""`diffrax_deer.scan`: the contract of `jax.lax.scan`, evaluated in parallel.

A scan with body $f(c, x) \mapsto (c', y)$ is the nonlinear recurrence

$$c_k = F(c_{k-1}, x_k), \qquad k = 1, \dots, T,$$

($F$ the carry part of $f$, $c_0$ the initial carry) followed by the outputs
$y_k = Y(c_{k-1}, x_k)$, which are independent of each other once the carries are known.
The carries are the root of the residual $r_k = c_k - F(c_{k-1}, x_k)$; Newton's method
on the whole trajectory linearises $F$ about the current guess,

$$c_k \approx J_k c_{k-1} + \big(F(\bar c_{k-1}, x_k) - J_k \bar c_{k-1}\big), \qquad
J_k = \partial F / \partial c\,(\bar c_{k-1}, x_k),$$

and solves that *linear* recurrence for every $k$ at once with the parallel scan of
[`diffrax_deer.linear_recurrence`][] (DEER: Lim et al., 2024). Keeping only the
diagonal of $J_k$ gives quasi-DEER (Gonzalez et al., 2024): $O(TD)$ memory and an
elementwise scan, at the price of linear instead of quadratic convergence. Either way,
after $i$ iterations the first $i$ carries are exact, so the iteration converges in at
most $T$ iterations from any guess; in practice a handful suffices for contractive
cells (most trained or randomly initialised RNNs).

The outputs $y_k$ are then computed from the converged carries by one batched
(`jax.vmap`-ed) call of $f$. Gradients never go through the Newton iterations: the
implicit function theorem at the converged carries gives them with one transposed
linear recurrence (exact Jacobian, DEER), or a short refinement with exact
Jacobian-vector products (quasi-DEER), so they are those of `jax.lax.scan` to solver
tolerance and cost memory independent of the number of iterations.
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jax.sharding import Mesh
from jaxtyping import Array, Float, PyTree

from ._misc import error_if, TreeFlattener
from ._newton import NewtonStats, previous_states, with_lyapunov_exponent
from ._recurrence import AbstractExplicitRecurrence
from ._root_finder import (
    AbstractTrajectoryRootFinder,
    root_finder_for,
    solve_trajectory,
)
from ._sharding import time_sharding, TimeSharding


Method = Literal["auto", "deer", "quasi-deer", "elk", "quasi-elk", "sequential"]
_METHODS = ("auto", "deer", "quasi-deer", "elk", "quasi-elk", "sequential")

# `method="auto"` uses DEER while its dense Jacobians, T * D^2 numbers per sequence,
# stay below this (128 MiB in float64; a few times that at peak), else quasi-DEER.
AUTO_DENSE_MAX_ENTRIES = 2**24

_NOT_CONVERGED = (
    "`diffrax_deer.scan`: the parallel ({method}) evaluation did not converge within "
    "`max_iters={max_iters}` Newton iterations. The recurrence may be expansive or "
    "chaotic over this sequence length, or the initial guess far off (the first "
    "linearisation can overshoot). Pass a warm start (`guess=`, e.g. the carries "
    "of the previous training step), increase `max_iters` (the sequence length "
    "always suffices), use `method='sequential'` (a plain `jax.lax.scan`), or pass "
    "`throw=False` (with `return_stats=True`) to get the unconverged result and its "
    "diagnostics."
)
_DIVERGED = (
    "`diffrax_deer.scan`: the parallel ({method}) evaluation diverged: its iterates "
    "were still non-finite (overflow or NaN) after `max_iters={max_iters}` Newton "
    "iterations. Use `method='sequential'` (a plain `jax.lax.scan`), increase "
    "`max_iters`, or pass `throw=False` (with `return_stats=True`) to get the result "
    "and its diagnostics."
)


class _ScanProblem(AbstractExplicitRecurrence):
    """The carries of a scan as a trajectory problem for the Newton layer: the
    recurrence $c_k = F(c_{k-1}, x_k)$.

    `step(c, x)` is the carry part of the scan body on flat `(D,)` carries, closure
    converted so that every array it closes over (e.g. an RNN cell's weights) is a
    leaf here, and is therefore differentiated by the implicit function theorem.
    `diagonal(c, x)`, if given, is a user-supplied diagonal of $\\partial F / \\partial c$
    (flat), used instead of `D` Jacobian-vector products by quasi-DEER.
    """

    step: Callable[[Array, Any], Array]
    diagonal: Callable[[Array, Any], Array] | None
    xs: PyTree
    carry0: Float[Array, " D"]
    jacobian: Literal["dense", "diagonal"] = eqx.field(static=True)
    time_sharding: TimeSharding | None = eqx.field(static=True, default=None)  # pyright: ignore[reportIncompatibleMethodOverride] (a field for the base's property)

    @property
    def init(self) -> Float[Array, " D"]:
        return self.carry0

    @property
    def points(self) -> PyTree:
        return self.xs

    def map(self, point, y: Float[Array, " D"]) -> Float[Array, " D"]:
        return self.step(y, point)

    @property
    def closed_form_diagonal(self):
        diagonal = self.diagonal
        if diagonal is None:
            return None
        return lambda x, c: diagonal(c, x)


def _trivial_stats(dtype) -> NewtonStats:
    """Stats of a solve that took no Newton iteration (sequential, or nothing to
    solve); counters not named here (e.g. rejected steps) are zero."""
    zero = jnp.array(0, jnp.int32)
    return NewtonStats(
        num_iters=zero,
        update_norm=jnp.array(0.0, dtype),
        result=optx.RESULTS.successful,
        num_rejected=zero,
        lyapunov_exponent=jnp.array(jnp.nan, dtype),
        min_window=zero,
        num_sequential=zero,
    )


def _flip(tree: PyTree) -> PyTree:
    return jtu.tree_map(lambda x: jnp.flip(x, axis=0), tree)


def _check_args(method, root_finder, shorthands, max_iters, jacobian_diagonal):
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {list(_METHODS)}; got {method!r}.")
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"`max_iters` must be an integer >= 1; got {max_iters!r}.")
    if root_finder is not None:
        if not isinstance(root_finder, AbstractTrajectoryRootFinder):
            raise TypeError(
                "`scan(root_finder=...)` must be a `diffrax_deer.ParallelNewton` or "
                f"`diffrax_deer.ELK`; got {type(root_finder).__name__}."
            )
        given = sorted(k for k, v in shorthands.items() if v is not None)
        if method != "auto" or given:
            raise ValueError(
                "`scan(root_finder=...)` takes its method, tolerances, norm and damping "
                "from the root finder: pass them to it, not to `scan`; got also "
                f"{given or ['method']}."
            )
        method = root_finder.method
    for name in ("rtol", "atol"):
        value = shorthands[name]
        if value is not None and not value > 0:
            raise ValueError(f"`{name}` must be positive; got {value}.")
    if jacobian_diagonal is not None and method not in ("auto", "quasi-deer", "quasi-elk"):
        raise ValueError(
            "`jacobian_diagonal` is only used by a diagonal root finder "
            "(`method='quasi-deer'` or `'quasi-elk'`, or "
            f"`ParallelNewton(jacobian='diagonal')`); got method={method!r}."
        )


def _resolve_root_finder(
    method: str, root_finder, shorthands: dict, T: int, D: int, has_diagonal: bool
) -> AbstractTrajectoryRootFinder:
    """The root finder `root_finder` or `method` names, `"auto"` resolved to DEER or
    quasi-DEER (see `scan`)."""
    if root_finder is not None:
        return root_finder
    if method == "auto":
        dense = not has_diagonal and T * D * D <= AUTO_DENSE_MAX_ENTRIES
        method = "deer" if dense else "quasi-deer"
    given = {k: v for k, v in shorthands.items() if v is not None}
    return root_finder_for(method, **given)


def _check_floating_carry(init: PyTree, method: str) -> None:
    for leaf in jtu.tree_leaves(init):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`diffrax_deer.scan(method={method!r})` needs a real floating-point "
                f"carry (Newton's method differentiates the body with respect to it); "
                f"got a carry leaf of dtype {dtype}. Cast the carry to a floating "
                "dtype, or use `method='sequential'` (a plain `jax.lax.scan`)."
            )


def _check_same_structure(what: str, tree: PyTree, like: PyTree) -> None:
    """Same PyTree structure and leaf shapes (dtypes are cast when flattened)."""
    tree_struct, like_struct = jtu.tree_structure(tree), jtu.tree_structure(like)
    shapes = [jnp.shape(x) for x in jtu.tree_leaves(tree)]
    like_shapes = [jnp.shape(x) for x in jtu.tree_leaves(like)]
    if tree_struct != like_struct or shapes != like_shapes:
        raise ValueError(
            f"`{what}` must have the PyTree structure {like_struct} with leaf shapes "
            f"{like_shapes}; got {tree_struct} with leaf shapes {shapes}."
        )


def scan(
    f: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
    init: PyTree,
    xs: PyTree = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    method: Method = "auto",
    root_finder: AbstractTrajectoryRootFinder | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    norm: Callable[[PyTree], Array] | None = None,
    max_iters: int = 100,
    throw: bool = True,
    guess: PyTree | None = None,
    jacobian_diagonal: Callable[[PyTree, PyTree], PyTree] | None = None,
    initial_damping: float | None = None,
    return_stats: bool = False,
    lyapunov: bool = False,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
):
    r"""`jax.lax.scan`, evaluated in parallel over the sequence by Newton's method.

    Same contract as `jax.lax.scan(f, init, xs, length, reverse, unroll)`: `f(carry, x)`
    returns `(carry, y)`; the result is `(final_carry, ys)` with `ys` stacked along a
    new leading axis. Instead of stepping through the sequence, the carries
    $c_1, \dots, c_T$ are found all at once as the root of
    $r_k = c_k - F(c_{k-1}, x_k)$ ($F$ the carry part of `f`): each Newton iteration
    is one batched evaluation of $F$ and of its Jacobian
    $J_k = \partial F / \partial c$ along the whole sequence, and one parallel scan of
    the linear recurrence $c_k = J_k c_{k-1} + F(\bar c_{k-1}, x_k) - J_k \bar c_{k-1}$
    about the current guess $\bar c$. Then `ys` comes from one `jax.vmap`-ed call of
    `f` on the converged carries. The answer is that of `jax.lax.scan` up to the Newton
    tolerance: the iteration stops when its last update is below `rtol`/`atol`
    (1e-8 in float64 by default); DEER's last step squares the error, so its answer is
    at round-off level, quasi-DEER's within about the tolerance (measured ~1e-9 for a
    GRU in float64). Pass smaller `rtol`/`atol` for more.

    **Methods.**

    - `"deer"`: full Jacobians (DEER, Lim et al. 2024). Quadratic convergence: 4-5
        iterations for a randomly initialised GRU, whatever `T`. $O(TD^2)$ memory and
        $O(TD^3)$ work per iteration for a carry of $D$ floats.
    - `"quasi-deer"`: only the diagonal of $J_k$ (Gonzalez et al. 2024). $O(TD)$
        memory (no `(T, D, D)` array is ever built) and an elementwise scan, but
        linear convergence: about 15 iterations for the same GRU. The diagonal costs
        `D` Jacobian-vector products over the sequence, or one call of
        `jacobian_diagonal` if given.
    - `"auto"` (default): `"deer"` while the dense Jacobians are small,
        $T D^2 \le 2^{24}$ (128 MiB per sequence in float64; e.g. any `T` up to
        $2.6 \cdot 10^5$ for $D = 8$, $T \le 4096$ for $D = 64$), otherwise
        `"quasi-deer"` (and `"quasi-deer"` whenever `jacobian_diagonal` is given).
        DEER's few iterations make it the faster method for small and moderate
        carries (measured on a 2-core CPU for a random GRU: 1.2-3x faster than
        quasi-DEER for $8 \le D \le 16$, about even at $D = 32$-$64$; see
        `benchmarks/results/scan_*`), and the size limit bounds its memory for wide
        cells and long sequences. Both give the same answer, to tolerance. The bound
        is per sequence: under `jax.vmap` memory scales with the batch. For wide
        cells a closed-form `jacobian_diagonal` makes quasi-DEER much cheaper per
        iteration (GRU, $D = 64$: 6x faster than DEER).
    - `"elk"`, `"quasi-elk"`: the same linearisations (full / diagonal), but each
        iteration is a trust-region Levenberg--Marquardt step computed by a parallel
        Kalman smoother (ELK, Gonzalez et al. 2024), its damping adapted by the ratio of
        actual to predicted residual reduction, starting from `initial_damping`.
        Slower per iteration; more robust when plain (quasi-)DEER overshoots on
        unstable recurrences. Once the undamped Newton step is within tolerance it is
        taken, so the answer is DEER's.
    - `"sequential"`: exactly `jax.lax.scan` (reference and fallback: chaotic or
        strongly expansive recurrences, where Newton may need up to $T$ iterations;
        or a tight sequential loop is simply faster, as often on CPUs).

    For a carry of one float both parallel methods are the same (the diagonal is the
    Jacobian).

    Both parallel methods converge in at most $T$ iterations from any guess (after
    $i$ iterations the first $i$ carries are exact); non-finite iterates (overflow,
    NaN) are reset to the previous iterate, which keeps that guarantee. So a solve
    that has run `T` iterations counts as converged even if its last update is still
    large (chaotic maps amplify round-off in the last carries), unless its last iterate
    was non-finite.

    **Never stuck (DEER, quasi-DEER).** If the Newton iteration has not converged after
    `max_iters` iterations, the carries from the first one whose last update was not
    small are evaluated one after another, as `jax.lax.scan` would: the answer is exact
    and reported successful, with `stats.num_sequential` saying how many carries were
    evaluated so (the parallel iteration's cost is bounded by `max_iters`, the
    sequential part by $T$). On the sine-wave GRU of `tests/test_robust.py` (T = 10 000,
    largest Lyapunov exponent ~0) the default does 100 iterations and 5 837 sequential
    steps; on a tanh RNN with an expansive linearisation (W = 3 x orthogonal, T = 2000)
    100 iterations and 1 851 steps. Such counts say that `method="sequential"` is the
    better choice for that recurrence. `root_finder=ParallelNewton(sequential_fallback=False)`
    reports the non-convergence instead, as the ELK methods do.

    **Gradients.** Reverse and forward mode (`jax.grad`, `jax.jvp`, ...) with respect
    to `init`, `xs` and every array `f` closes over (e.g. the weights of an
    `equinox.nn.GRUCell` used inside `f`) are those of `jax.lax.scan` to solver
    tolerance, for both methods. They come from the implicit function theorem at the
    converged carries (one transposed linear scan for DEER; for quasi-DEER a short
    refinement with exact Jacobian-vector products, so they do not inherit the
    diagonal approximation), and memory does not grow with the number of iterations.
    Higher-order derivatives are not supported.

    **Arguments:**

    - `f`, `init`, `xs`, `length`, `reverse`: as for `jax.lax.scan`. The carry must
        consist of real floating-point arrays of one dtype (for the parallel methods);
        `xs` and `ys` may be any PyTrees of arrays.
    - `unroll`: passed to `jax.lax.scan` by `method="sequential"`; ignored otherwise.
    - `method`: `"auto"` (default), `"deer"`, `"quasi-deer"`, `"elk"`, `"quasi-elk"`
        or `"sequential"`; see above.
    - `root_finder`: instead of `method` (and of `rtol`, `atol`, `norm`,
        `initial_damping`), the root finder itself with its options:
        [`diffrax_deer.ParallelNewton`][] (`jacobian="dense"`: DEER, `"diagonal"`:
        quasi-DEER) or [`diffrax_deer.ELK`][] (ELK / quasi-ELK), e.g.
        `root_finder=ParallelNewton(rtol=1e-10, atol=1e-10, jacobian="diagonal")`.
    - `rtol`, `atol`: Newton tolerances; the iteration stops when its last update
        $\delta$ satisfies $\|\delta / (\text{atol} + \text{rtol}\,|c|)\| \le 1$.
        Default (None): 1e-8 in float64, about 2e-5 in float32.
    - `norm`: norm of the scaled update, as in optimistix. Default (None)
        `optimistix.max_norm`.
    - `max_iters`: maximum Newton iterations. Default 100.
    - `throw`: if the iteration does not converge within `max_iters` (or stays
        non-finite) and is not completed sequentially (see above: ELK, or
        `sequential_fallback=False`; or a recurrence that overflows), raise a runtime
        error (default) or, with `throw=False`, return the
        last iterate; check `stats.result` (`return_stats=True`) in that case.
    - `guess`: optional initial guess of the carries, a PyTree like `init` with a
        leading axis of length `T`, `guess[k]` approximating the carry after the step
        that consumes `xs[k]` (whatever `reverse`). E.g. the carries from the previous
        training step, to warm-start. Default: `init` repeated (the DEER paper's
        choice). Never differentiated; it changes only the iteration count.
    - `initial_damping`: the ELK methods' starting damping (default (None): 1).
    - `jacobian_diagonal`: for quasi-DEER and quasi-ELK only, an optional function
        `(carry, x) -> PyTree like carry` giving the diagonal of
        $\partial F / \partial c$ cheaply (e.g. in closed form for a GRU), instead of
        `D` Jacobian-vector products. An inexact diagonal only slows convergence; the
        result and its gradients stay exact.
    - `return_stats`: also return a [`diffrax_deer.NewtonStats`][] (`num_iters`,
        `update_norm`, `result`, ...). `result` is an `optimistix.RESULTS`:
        `successful`, `nonlinear_max_steps_reached` or `nonlinear_divergence` (still
        non-finite at the end). With `method="sequential"` the stats say 0 iterations,
        successful.
    - `lyapunov`: also estimate the largest Lyapunov exponent of the result, per step,
        into `stats.lyapunov_exponent` (one more Jacobian evaluation and scan; see
        [`diffrax_deer.lyapunov_exponent`][]). Negative: the recurrence forgets
        perturbations and parallel evaluation pays off at any length; positive: it
        amplifies them like $e^{\lambda k}$, Newton may need up to `T` iterations, so
        prefer `method="sequential"`. Under quasi-DEER / quasi-ELK the estimate uses the
        Jacobian diagonals (that of the approximate linearisation).
    - `mesh`, `axis_name`: shard the sequence over the axis `axis_name` (default: the
        mesh's only axis) of the `jax.sharding.Mesh` `mesh`: each device holds and
        works on its slice of the carries, `xs` and `ys`, and the parallel scans
        exchange one aggregate per device (see [`diffrax_deer.DEER`][]'s "many
        devices"). Default (None): one device. Ignored by `method="sequential"`.

    **Returns:**

    `(final_carry, ys)` exactly as `jax.lax.scan`, or `(final_carry, ys, stats)` with
    `return_stats=True`.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp, diffrax_deer

        cell = eqx.nn.GRUCell(2, 8, key=jax.random.PRNGKey(0))
        xs = jax.random.normal(jax.random.PRNGKey(1), (10_000, 2))

        def step(h, x):
            h = cell(x, h)
            return h, h

        h_T, hs = diffrax_deer.scan(step, jnp.zeros(8), xs)        # == jax.lax.scan
        h_T, hs, stats = diffrax_deer.scan(
            step, jnp.zeros(8), xs, method="quasi-deer", return_stats=True
        )
        stats.num_iters                                            # Newton iterations
        ```
    """
    shorthands = dict(rtol=rtol, atol=atol, norm=norm, damping=initial_damping)
    sharding = time_sharding(mesh, axis_name, "scan")
    _check_args(method, root_finder, shorthands, max_iters, jacobian_diagonal)
    xs = jtu.tree_map(jnp.asarray, xs)
    # Let `jax.lax.scan` check the contract (lengths, carry structure and types) and
    # tell us the types of its results; this traces `f` once, evaluates nothing.
    carry_struct, _ = jax.eval_shape(
        lambda i, x: lax.scan(f, i, x, length=length, reverse=reverse), init, xs
    )
    # Weakly typed initial carries are promoted as `jax.lax.scan` does.
    init = jtu.tree_map(lambda c, s: jnp.asarray(c, s.dtype), init, carry_struct)
    xs_leaves = jtu.tree_leaves(xs)
    T = int(length) if length is not None else xs_leaves[0].shape[0]

    def finish(final, ys, stats):
        return (final, ys, stats) if return_stats else (final, ys)

    if method == "sequential" or T == 0:
        final, ys = lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)
        return finish(final, ys, _trivial_stats(_stats_dtype(init)))
    _check_floating_carry(init, method)
    if len(jtu.tree_leaves(init)) == 0:
        # No carry: a scan is a map.
        ys = jax.vmap(lambda x: f(init, x)[1], axis_size=T)(xs)
        return finish(init, ys, _trivial_stats(jnp.result_type(float)))

    flattener = TreeFlattener(init, what="init")
    finder = _resolve_root_finder(
        method, root_finder, shorthands, T, flattener.size, jacobian_diagonal is not None
    )
    if reverse:
        xs = _flip(xs)
    problem = _problem(
        f, init, flattener, xs, carry_struct, finder.jacobian, jacobian_diagonal, sharding
    )
    guess_flat = _flat_guess(guess, problem.carry0, flattener, carry_struct, T, reverse)
    carries, stats = solve_trajectory(problem, guess_flat, finder, max_iters)
    if lyapunov:
        stats = with_lyapunov_exponent(stats, problem, carries, 1.0)
    if throw:
        carries = _raise_if_failed(carries, stats, finder.method, max_iters)
    final, ys = _outputs(f, flattener, problem.carry0, carries, problem.xs, reverse)
    ys = problem.shard(ys)
    return finish(final, ys, stats)


def _stats_dtype(init: PyTree):
    """The floating dtype of the stats of a sequential scan (the carry's, if it has
    one)."""
    leaves = jtu.tree_leaves(init)
    dtype = jnp.result_type(leaves[0]) if leaves else jnp.result_type(float)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _problem(
    f, init, flattener, xs, carry_struct, jacobian, jacobian_diagonal, sharding
) -> _ScanProblem:
    """The carries of the scan `f` from `init` over (forward-ordered) `xs` as a
    trajectory problem on flat carries, sharded along time by `sharding` (or not)."""
    x_struct = jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs)
    c_struct = jax.ShapeDtypeStruct((flattener.size,), flattener.dtype)

    def flat_step(c, x):
        return flattener.ravel(f(flattener.unravel(c), x)[0])

    # Closure conversion turns the arrays `f` closes over (a cell's weights, maybe
    # tracers of an outer `grad`/`vmap`) into leaves of the problem, so that the
    # implicit differentiation in the Newton layer sees them.
    step = eqx.filter_closure_convert(flat_step, c_struct, x_struct)
    diagonal = None
    if jacobian_diagonal is not None:
        diag_struct = jax.eval_shape(
            lambda c, x: jacobian_diagonal(flattener.unravel(c), x), c_struct, x_struct
        )
        _check_same_structure("jacobian_diagonal(carry, x)", diag_struct, carry_struct)

        def flat_diagonal(c, x):
            return flattener.ravel(jacobian_diagonal(flattener.unravel(c), x))

        diagonal = eqx.filter_closure_convert(flat_diagonal, c_struct, x_struct)

    # With one state the diagonal is the Jacobian: quasi-DEER is DEER (and its
    # implicit derivative needs a single scan).
    dense = jacobian == "dense" or (flattener.size == 1 and diagonal is None)
    return _ScanProblem(  # pyright: ignore[reportCallIssue] (exact_jacobian: a property)
        step=step,
        diagonal=diagonal,
        xs=xs if sharding is None else sharding.constrain(xs),
        carry0=flattener.ravel(init),
        jacobian="dense" if dense else "diagonal",
        time_sharding=sharding,
    )


def _flat_guess(guess, init_flat, flattener, carry_struct, T, reverse) -> Float[Array, "T D"]:
    """The initial guess of the flat carries in forward order: `guess` (checked
    against the carry's structure) or the initial carry repeated."""
    if guess is None:
        return jnp.broadcast_to(init_flat, (T, init_flat.size))
    guess_like = jtu.tree_map(
        lambda s: jax.ShapeDtypeStruct((T,) + s.shape, s.dtype), carry_struct
    )
    _check_same_structure("guess", guess, guess_like)
    guess_flat = flattener.ravel_stacked(guess)
    return jnp.flip(guess_flat, axis=0) if reverse else guess_flat


def _raise_if_failed(carries, stats: NewtonStats, method: str, max_iters: int):
    """`carries`, raising at run time if the solve did not converge (`throw=True`)."""
    failed = stats.result != optx.RESULTS.successful
    diverged = stats.result == optx.RESULTS.nonlinear_divergence
    messages = [
        msg.format(method=method, max_iters=max_iters) for msg in (_NOT_CONVERGED, _DIVERGED)
    ]
    return error_if(carries, failed, messages, diverged.astype(jnp.int32))


def _outputs(f, flattener, init_flat, carries, xs, reverse):
    """`(final_carry, ys)` of the scan from its converged flat carries: the outputs by
    one batched call of `f` on the previous carries, in the caller's order."""
    prev = flattener.unravel_stacked(previous_states(init_flat, carries))
    _, ys = jax.vmap(f)(prev, xs)
    final = flattener.unravel(carries[-1])
    return final, _flip(ys) if reverse else ys
