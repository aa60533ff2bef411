"""Sequence parallelism, run in processes of their own: the sharded tests
(`tests/sharded/test_sharded.py`) need 4 host devices, set by `XLA_FLAGS` before JAX
starts; the multi-host test needs two `jax.distributed` processes."""

import os
import pathlib
import socket
import subprocess
import sys


HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def test_sharded_on_four_devices():
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sharded"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes():
    # `jax.distributed` on localhost: two processes of one CPU device each, JAX's CPU
    # collectives between them; each checks the sharded solves against its own.
    worker = str(HERE / "sharded" / "distributed_worker.py")
    port = str(_free_port())
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), port], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
        assert "errors" in out, out[-2000:]
