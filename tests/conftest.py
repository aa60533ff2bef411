import jax


# Run like diffrax's own test suite: float64 by default, and no implicit rank promotion
# (code that silently broadcasts (D,) against (T, D) would fail here).
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
