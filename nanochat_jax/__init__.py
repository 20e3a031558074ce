"""nanochat_jax: karpathy's nanochat rewritten in JAX/Flax NNX."""
