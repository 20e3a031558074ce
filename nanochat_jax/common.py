"""Small helpers shared by every stage."""
import os


def get_base_dir():
    """All artifacts (tokenizer, data, checkpoints, report) live under $NANOCHAT_JAX_HOME."""
    base = os.environ.get("NANOCHAT_JAX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat_jax")
    os.makedirs(base, exist_ok=True)
    return base

