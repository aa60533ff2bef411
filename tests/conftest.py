import os


# Several pytest-xdist workers may share one GPU: none may take most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402


# Run like diffrax's own test suite: float64 by default, and no implicit rank promotion
# (code that silently broadcasts (D,) against (T, D) would fail here).
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


def _under_xdist() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (the default, `-n auto` in pyproject.toml: JAX compiles on one
    # core; two workers took the suite from 15-16 to 11.5-12 min on two cores), the
    # subprocess-based tests go first: the worker that takes them waits on their
    # processes while the others run the rest of the suite.
    if _under_xdist():
        items.sort(key=lambda item: not item.module.__name__.endswith("test_sharding"))


def pytest_collection_finish(session):
    # Without xdist, start the subprocess-based tests of `tests/test_sharding.py` that
    # were collected, to run alongside the rest of the suite (see that module). Under
    # xdist every worker collects every test, so each test starts its own processes
    # when it runs instead.
    if _under_xdist():
        return
    names = {
        item.name.removeprefix("test_").removeprefix("sharded_on_")
        for item in session.items
        if item.module.__name__.endswith("test_sharding")
    }
    if names:
        from tests import test_sharding

        test_sharding.start_background(sorted(names))
