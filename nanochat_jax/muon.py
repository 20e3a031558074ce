"""
Muon (MomentUm Orthogonalized by Newton-Schulz) as an optax GradientTransformation, following nanochat v1.
- Nesterov momentum without bias correction: buf = μ·buf + (1−μ)·g, then g = (1−μ)·g + μ·buf
- 5 quintic Newton-Schulz steps in bfloat16 turn the update into ~U·S'·Vᵀ with S' ≈ U(0.5, 1.5)
- the update is scaled by sqrt(max(1, fan_out/fan_in)) and carries no lr (chain a learning rate after it)
Only for 2-D matrices in Flax layout (fan_in, fan_out); matrices of one shape are orthogonalized as one
batch, and under a mesh of several devices that batch is split over the devices (each orthogonalizes its
share, as nanochat's DistMuon does by rank). Sharded params work under jit: see `newton_schulz`.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

# Quintic coefficients from Keller Jordan's Muon: picked to maximise the slope at zero so that small
# singular values grow fast; the price is that they settle in ~(0.5, 1.5) instead of exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, coeffs=NS_COEFFS, dtype=jnp.bfloat16):
    """Approximately orthogonalize a matrix G (..., m, n), or a stack of them; returns it in `dtype`.
    On sharded G every matmul below runs on the whole matrix, so GSPMD all-gathers (or reduce-scatters)
    G and X·Xᵀ across whatever fsdp/tensor axes shard it. Simple, and cheap next to fwd/bwd at our sizes."""
    a, b, c = coeffs
    X = G.astype(dtype)  # bf16 like nanochat: NS is stable in low precision and ~2x faster on tensor cores
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT  # NS(Xᵀ) = NS(X)ᵀ, so work on the wide side: X·Xᵀ is then the smaller (rows, rows) Gram
    X = X / (jnp.linalg.norm(X, axis=(-2, -1), keepdims=True) + 1e-7)  # Frobenius >= spectral norm: all singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X  # X ← aX + b(XXᵀ)X + c(XXᵀ)²X, odd polynomial in the singular values
    return X.mT if tall else X


def spread_over_devices(stack):
    """Split a stack of matrices (n, m, k) by its first axis over the active mesh's axes, as many as divide n,
    so each device runs Newton-Schulz on its share only: with data parallelism every device would otherwise
    orthogonalize every matrix. XLA gathers the results back into the params' layouts. No mesh: as is."""
    mesh = jax.sharding.get_abstract_mesh()
    axes, devices = [], 1
    for name, size in ({} if mesh.empty else mesh.shape).items():
        if size > 1 and stack.shape[0] % (devices * size) == 0:
            axes.append(name)
            devices *= size
    if not axes:
        return stack
    return jax.lax.with_sharding_constraint(stack, NamedSharding(mesh, P(tuple(axes))))


def aspect_scale(shape):
    """nanochat's sqrt(max(1, rows/cols)) for torch (out, in) weights; a Flax kernel is (in, out)."""
    fan_in, fan_out = shape
    return max(1.0, fan_out / fan_in) ** 0.5  # so c_fc (D, 4D) gets 2x, everything else 1x


class MuonState(NamedTuple):
    count: jax.Array  # int32 (), updates done so far; the argument of a momentum schedule
    buf: optax.Updates  # fp32 momentum buffers, one per matrix


def _check_2d(tree):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if x.ndim != 2:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise ValueError(f"Muon is for 2-D matrices, got {name!r} with shape {x.shape}")


def scale_by_muon(momentum=0.95, nesterov=True, ns_steps=5, ns_coeffs=NS_COEFFS, ns_dtype=jnp.bfloat16):
    """Muon's update direction (lr not applied). `momentum` is a float, a traced scalar (inject_hyperparams)
    or a schedule of the step count. Under inject_hyperparams pass static_args=('ns_steps', 'ns_dtype')."""

    def init_fn(params):
        _check_2d(params)
        buf = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)  # keeps p's sharding
        return MuonState(count=jnp.zeros([], jnp.int32), buf=buf)

    def update_fn(updates, state, params=None):
        del params
        _check_2d(updates)
        mu = momentum(state.count) if callable(momentum) else momentum

        def momentum_step(g, buf):
            g32 = g.astype(jnp.float32)
            buf = mu * buf + (1 - mu) * g32  # nanochat's buf.lerp_(g, 1 - μ), no bias correction
            return ((1 - mu) * g32 + mu * buf if nesterov else buf), buf  # g.lerp_(buf, μ)

        g_leaves, treedef = jax.tree.flatten(updates)
        stepped = [momentum_step(g, buf) for g, buf in zip(g_leaves, treedef.flatten_up_to(state.buf))]
        # Orthogonalize matrices of one shape (up to a transpose) as one stack, for d20 80 of (D, D) and 40 of
        # (D, 4D): a few batched matmuls per NS step instead of one small launch per matrix.
        wide = [g if g.shape[0] <= g.shape[1] else g.T for g, _ in stepped]  # NS(Gᵀ) = NS(G)ᵀ
        groups = {}
        for i, g in enumerate(wide):
            groups.setdefault(g.shape, []).append(i)
        orthogonal = [None] * len(g_leaves)
        for idx in groups.values():
            O = newton_schulz(spread_over_devices(jnp.stack([wide[i] for i in idx])), ns_steps, ns_coeffs, ns_dtype)
            for j, i in enumerate(idx):
                g = g_leaves[i]
                o = O[j] if g.shape == wide[i].shape else O[j].T
                orthogonal[i] = aspect_scale(g.shape) * o.astype(g.dtype)
        new_updates = treedef.unflatten(orthogonal)
        new_buf = treedef.unflatten([buf for _, buf in stepped])
        return new_updates, MuonState(count=optax.safe_increment(state.count), buf=new_buf)

    return optax.GradientTransformation(init_fn, update_fn)
