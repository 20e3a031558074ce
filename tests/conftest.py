import os
import tempfile

import jax

# Tests never read or write the user's ~/.cache/nanochat_jax: one throwaway home per test session.
os.environ["NANOCHAT_JAX_HOME"] = tempfile.mkdtemp(prefix="nanochat_jax_test_home_")

# Eight simulated CPU devices, so sharded code runs on real meshes (must precede JAX's first use).
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")  # silent broadcasting fails loudly
