"""
nanochat v1's optimizer setup as one optax transform, plus its LR and momentum schedules.
- Muon (lr 0.02) on every matrix under `blocks`; AdamW on `wte` (lr 0.2) and `lm_head` (lr 0.004),
  both AdamW lrs × (D/768)^-0.5; AdamW betas (0.8, 0.95), eps 1e-10, decoupled weight decay (torch semantics)
- one LR multiplier for all groups: linear warmup, constant, linear warmdown to final_lr_frac
- Muon momentum ramps 0.85 -> 0.95 over the first 300 steps
The schedules are traced functions of the optimizer's step count, so a changing lr never recompiles.
Use: `nnx.Optimizer(model, build_optimizer(D, T), wrt=nnx.Param)`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanochat_jax.muon import scale_by_muon

# -----------------------------------------------------------------------------
# Schedules as plain Python (the training loop logs these)


def lr_multiplier(it, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """nanochat v1 base_train's LR multiplier at step `it` of `num_iterations`."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it):
    """Muon momentum at step `it`: 0.85 -> 0.95 linearly over 300 steps, then flat."""
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def traced_schedule(f, corners):
    """f as a jnp function of the step count, for an f that is linear between the integer `corners`
    and flat after the last: interpolating f's own values there is exact, so the formula lives only once."""
    xs = np.array(corners, np.float32)  # numpy: a constant wherever it is traced (tx may be built inside jit)
    ys = np.array([f(c) for c in corners], np.float32)
    return lambda count: jnp.interp(count, xs, ys)  # past the last corner: holds f(corners[-1])

def lr_schedule(num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """lr_multiplier as the traced function of the optimizer's update count that build_optimizer applies. The
    count advances once per optimizer step, however many micro-batches it accumulates, and past the last step
    the multiplier holds its final value (never below final_lr_frac)."""
    T = num_iterations
    warmup_iters, warmdown_iters = round(warmup_ratio * T), round(warmdown_ratio * T)
    assert warmup_iters <= T - warmdown_iters, "warmup and warmdown overlap"
    f = functools.partial(lr_multiplier, num_iterations=T, warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio,
                          final_lr_frac=final_lr_frac)
    return traced_schedule(f, [0, max(warmup_iters - 1, 0), T - warmdown_iters, T])

# -----------------------------------------------------------------------------
# Parameter groups

GROUPS = {"blocks": "muon", "wte": "embedding", "lm_head": "unembedding"}


def param_labels(params):
    """The optimizer group of every leaf, read off its key path ('blocks/3/mlp/c_fc/kernel' -> 'muon')."""

    def label(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        hits = [GROUPS[part] for part in name.split("/") if part in GROUPS]
        if not hits:
            raise ValueError(f"parameter {name!r} has no optimizer group: expected it under one of {list(GROUPS)}")
        return hits[0]

    return jax.tree_util.tree_map_with_path(label, params)


def build_optimizer(d_model, num_iterations=None, *, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                    weight_decay=0.0, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0,
                    adam_betas=(0.8, 0.95), adam_eps=1e-10, schedule=True, ns_dtype=jnp.bfloat16):
    """Muon + AdamW over a param tree (an nnx.State of Params, or a dict with the same keys).
    schedule=False or num_iterations=None: constant lrs and momentum 0.95 (as in the golden train file).
    ns_dtype: Newton-Schulz precision (bf16 as nanochat; fp32 for exact comparisons)."""
    if schedule and num_iterations is not None:
        lrm = lr_schedule(num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac)
        momentum = traced_schedule(muon_momentum, [0, 300])
    else:
        lrm, momentum = (lambda count: 1.0), 0.95
    dmodel_lr_scale = (d_model / 768) ** -0.5  # AdamW lrs were tuned at D=768; Muon's need no scaling

    def scheduled(lr):
        return lambda count: lr * lrm(count)

    def adamw(lr):
        # optax.adamw is torch's AdamW: bias-corrected moments, and p -= lr·wd·p decoupled from the Adam step
        return optax.adamw(scheduled(lr), b1=adam_betas[0], b2=adam_betas[1], eps=adam_eps, weight_decay=weight_decay)

    return optax.partition({
        "muon": optax.chain(scale_by_muon(momentum, ns_dtype=ns_dtype), optax.scale_by_learning_rate(scheduled(matrix_lr))),
        "embedding": adamw(embedding_lr * dmodel_lr_scale),
        "unembedding": adamw(unembedding_lr * dmodel_lr_scale),
    }, param_labels)
