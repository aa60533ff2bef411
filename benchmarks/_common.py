"""Shared helpers for the benchmark scripts in this folder.

- `compile_jitted`: lower + compile a function once, timing the compilation and reading
  XLA's static memory estimate of the compiled program;
- `time_call`: steady-state wall time (warm-up call, `jax.block_until_ready`, several
  repeats; min and median);
- `machine_info` / `platform_tag`: what the numbers were measured on;
- `Section` / `write_results`: save results as JSON and as a markdown table under
  `benchmarks/results/<name>_<platform>_py<major.minor>.{json,md}`.

These are scripts' helpers, not part of the library: nothing here is imported by
`diffrax_deer`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def enable_float64() -> None:
    """All benchmarks run in float64 (as the library's tests do)."""
    jax.config.update("jax_enable_x64", True)


# --------------------------------------------------------------------------------------
# Compilation and memory
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    """A compiled function plus what compiling it told us."""

    fn: Callable  # call like the original jitted function (positional array args)
    compile_s: float  # wall time of `lower(...)` + `compile()` (tracing included)
    memory_bytes: int | None  # XLA's estimate of device memory the call needs


def memory_bytes(compiled) -> int | None:
    """Peak device memory of one call of a compiled XLA program, from its static buffer
    assignment: `peak_memory_in_bytes` where the backend reports it, else
    arguments + outputs + temporaries (an upper-ish estimate: it ignores aliasing and
    counts every temporary as live at once). `None` if the backend gives no analysis."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if stats is None:
        return None
    peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - getattr(stats, "alias_size_in_bytes", 0)
    )
    return int(max(peak, total))


def compile_jitted(fn: Callable, *args) -> Compiled:
    """`jax.jit(fn)`, lowered and compiled for `args`; times tracing + compilation.

    The returned `Compiled.fn` is the ahead-of-time compiled executable, so calling it
    never recompiles (and the compile time is measured exactly once)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return Compiled(fn=compiled, compile_s=compile_s, memory_bytes=memory_bytes(compiled))


def rss_peak_bytes() -> int:
    """High-water resident set size of this process so far (Linux: ru_maxrss is KiB).

    Monotone over the process' life, so it bounds every benchmark run before it; the
    per-call figure is `Compiled.memory_bytes`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    min_s: float
    median_s: float
    repeats: int
    first_s: float  # the warm-up call (for AOT-compiled functions: no compilation in it)
    output: Any  # the output of the last call, for checking results


def time_call(
    fn: Callable, *args, repeats: int = 5, max_total_s: float = 20.0
) -> Timing:
    """Steady-state wall time of `fn(*args)`.

    One warm-up call, then up to `repeats` timed calls, each ended by
    `jax.block_until_ready`. Slow functions get fewer repeats so that the timed calls
    take at most about `max_total_s` (always at least one)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first_s = time.perf_counter() - start
    n = max(1, min(repeats, int(max_total_s / max(first_s, 1e-9))))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times), n, first_s, out)


# --------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_bytes(field: str) -> int | None:
    """A field of /proc/meminfo (e.g. `MemTotal`), in bytes; None where unreadable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ram_bytes() -> int | None:
    return _meminfo_bytes("MemTotal")


def available_ram_bytes() -> int | None:
    """`MemAvailable` from /proc/meminfo (memory a new allocation can get)."""
    return _meminfo_bytes("MemAvailable")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def platform_tag() -> str:
    """`"cpu"`, or the accelerator's name as a file-name-safe slug
    (e.g. `"nvidia-h100-80gb-hbm3"`)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    kind = getattr(device, "device_kind", device.platform)
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or device.platform


def machine_info() -> dict:
    """Everything needed to say what the numbers were measured on."""
    ram = _ram_bytes()
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores,
        "ram_gib": None if ram is None else round(ram / 2**30, 1),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": getattr(jax.devices()[0], "device_kind", None),
        "platform": platform_tag(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "diffrax", "equinox", "optimistix", "lineax")
        },
        "diffrax_deer": _version("diffrax_deer"),
        "x64": bool(jax.config.jax_enable_x64),
    }


def describe_machine(info: dict | None = None) -> str:
    """One line, e.g. for the top of a markdown file or a progress log."""
    info = machine_info() if info is None else info
    v = info["versions"]
    return (
        f"{info['cpu_model']} ({info['cpu_cores_usable']} usable of "
        f"{info['cpu_cores']} cores, {info['ram_gib']} GiB RAM); devices "
        f"{', '.join(info['devices'])}; Python {info['python']}, jax {v['jax']}, "
        f"jaxlib {v['jaxlib']}, diffrax {v['diffrax']}, equinox {v['equinox']}"
    )


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Column:
    key: str  # key in each row dict
    header: str  # markdown header
    fmt: str | Callable[[Any], str] = "{}"  # format string or function of the value


@dataclasses.dataclass
class Section:
    title: str
    columns: Sequence[Column]
    rows: list[dict]
    description: str = ""


def fmt_time(seconds: float | None) -> str:
    """Human-readable duration: µs / ms / s with 3 significant figures."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.2e}"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}x"


def _format(value, fmt) -> str:
    if value is None:
        return "–"
    if callable(fmt):
        return fmt(value)
    return fmt.format(value)


# Columns several benchmarks share.
PROBLEM = Column("problem", "problem")
METHOD = Column("method", "method")
TIME = Column("time_s", "time", fmt_time)
COMPILE = Column("compile_s", "compile", fmt_time)
NEWTON_ITERS = Column("iters", "Newton it.")
COARSE_ITERS = Column("coarse_iters", "coarse it.")
MAX_ERR = Column("err", "max err", fmt_sci)


def markdown_table(section: Section) -> str:
    lines = [
        "| " + " | ".join(c.header for c in section.columns) + " |",
        "|" + "|".join("---" for _ in section.columns) + "|",
    ]
    for row in section.rows:
        cells = [_format(row.get(c.key), c.fmt) for c in section.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _jsonable(x):
    """Make numpy/jax scalars JSON-serialisable."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write_results(
    name: str,
    sections: Sequence[Section],
    *,
    title: str,
    config: dict | None = None,
    notes: Sequence[str] = (),
    results_dir: Path = RESULTS_DIR,
    dtype_note: str = "float64",
    info: dict | None = None,
) -> tuple[Path, Path]:
    """Writes `<name>_<platform>_py<major.minor>.json` and `.md` under `results_dir`.

    The JSON holds raw values (seconds, bytes) per row; the markdown starts with the
    machine, then each section as a table."""
    info = machine_info() if info is None else info
    python = ".".join(info["python"].split(".")[:2])
    stem = f"{name}_{info['platform']}_py{python}"
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{stem}.json"
    md_path = results_dir / f"{stem}.md"
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload = {
        "benchmark": name,
        "title": title,
        "date_utc": when,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": info,
        "config": config or {},
        "notes": list(notes),
        "sections": [
            {"title": s.title, "description": s.description, "rows": s.rows}
            for s in sections
        ],
        "process_peak_rss_bytes": rss_peak_bytes(),
    }
    json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")

    md = [
        f"# {title}",
        "",
        f"**Machine:** {describe_machine(info)}",
        "",
        f"Measured {when} with `{payload['command']}`; {dtype_note}; times are steady-state "
        "wall times (warm-up call excluded, `jax.block_until_ready`), min over repeats.",
        "",
    ]
    if config:
        md += ["Configuration: " + ", ".join(f"`{k}={v}`" for k, v in config.items()), ""]
    for note in notes:
        md += [f"- {note}"]
    if notes:
        md.append("")
    for s in sections:
        md += [f"## {s.title}", ""]
        if s.description:
            md += [s.description, ""]
        md += [markdown_table(s), ""]
    md += [f"Process peak RSS: {fmt_bytes(rss_peak_bytes())}.", ""]
    md_path.write_text("\n".join(md))
    return json_path, md_path


def log(msg: str) -> None:
    """Progress output, flushed at once (benchmarks run for minutes)."""
    print(msg, flush=True)
