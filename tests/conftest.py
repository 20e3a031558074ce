import os
import tempfile

# Tests never read or write the user's ~/.cache/nanochat_jax: one throwaway home per test session.
os.environ["NANOCHAT_JAX_HOME"] = tempfile.mkdtemp(prefix="nanochat_jax_test_home_")
