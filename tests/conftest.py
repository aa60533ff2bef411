import jax


# Run like diffrax's own test suite: float64 by default, and no implicit rank promotion
# (code that silently broadcasts (D,) against (T, D) would fail here).
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_finish(session):
    # Start the subprocess-based tests of `tests/test_sharding.py` that were collected,
    # to run alongside the rest of the suite (see that module).
    names = {
        item.name.removeprefix("test_").removeprefix("sharded_on_")
        for item in session.items
        if item.module.__name__.endswith("test_sharding")
    }
    if names:
        from tests import test_sharding

        test_sharding.start_background(sorted(names))
