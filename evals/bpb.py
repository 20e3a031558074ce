"""
Bits per byte: the model's cross-entropy per byte of text, which (unlike loss per token) does not
depend on the tokenizer. Σ nats(t)·[bytes(target_t) > 0] / (ln 2 · Σ bytes(target_t)); ignored targets
(-1) and special tokens (0 bytes) count for nothing. Vocab-size independent: the main pretraining metric.
"""
import math

import jax.numpy as jnp

from nanochat_jax.sharding import global_batch


def evaluate_bpb(eval_step, state, loader, steps, token_bytes, mesh):
    """bpb over `steps` batches of loader ({'inputs', 'targets'} per process). eval_step(state, x, y)
    returns per-token nats (B, T). Sums are global (over all processes) since the arrays are."""
    token_bytes = jnp.asarray(token_bytes)
    total_nats, total_bytes = 0.0, 0
    for _ in range(steps):
        try:
            batch = next(loader)
        except StopIteration:  # the val split is smaller than asked for: use all of it
            break
        x, y = global_batch(batch["inputs"], mesh), global_batch(batch["targets"], mesh)
        nats = eval_step(state, x, y)
        nbytes = jnp.where(y >= 0, token_bytes[jnp.maximum(y, 0)], 0)
        total_nats += float(jnp.sum(jnp.where(nbytes > 0, nats, 0.0)))  # syncs: fine, evals are rare
        total_bytes += int(jnp.sum(nbytes))
    return total_nats / (math.log(2) * total_bytes) if total_bytes else float("inf")
