"""Sequence parallelism, run in processes of their own: the sharded tests
(`tests/sharded/test_sharded.py`) need 4 host devices, set by `XLA_FLAGS` before JAX
starts; the multi-host test needs two `jax.distributed` processes.

In one pytest process (`-n 0`) the processes start when the session's collection
finishes (`conftest.py` calls `start_background`), so that they run on the second core
while the rest of the suite compiles on the first (JAX compiles on one core). Under
pytest-xdist (the default) these tests are sorted first and start their processes when
they run, in the worker that takes them. Either way the tests here wait for them."""

import os
import pathlib
import socket
import subprocess
import sys


HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
_STARTED: dict[str, list[subprocess.Popen]] = {}


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _spawn(command: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_four_devices() -> list[subprocess.Popen]:
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
        "tests/sharded",
    ]
    return [_spawn(command, XLA_FLAGS="--xla_force_host_platform_device_count=4")]


def _start_two_processes() -> list[subprocess.Popen]:
    # `jax.distributed` on localhost: two processes of one CPU device each, JAX's CPU
    # collectives between them; each checks the sharded solves against its own.
    worker = str(HERE / "sharded" / "distributed_worker.py")
    port = str(_free_port())
    flags = "--xla_force_host_platform_device_count=1"
    return [_spawn([sys.executable, worker, str(i), port], XLA_FLAGS=flags) for i in range(2)]


_STARTERS = {"four_devices": _start_four_devices, "two_processes": _start_two_processes}


def start_background(names) -> None:
    for name in names:
        if name not in _STARTED:
            _STARTED[name] = _STARTERS[name]()


def _outputs(name: str) -> list[tuple[int, str]]:
    start_background([name])
    procs = _STARTED.pop(name)
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


def test_sharded_on_four_devices():
    [(returncode, out)] = _outputs("four_devices")
    assert returncode == 0, out[-8000:]
    assert " passed" in out and "skipped" not in out, out[-2000:]


def test_two_processes():
    for returncode, out in _outputs("two_processes"):
        assert returncode == 0, out[-4000:]
        assert "errors" in out, out[-2000:]
