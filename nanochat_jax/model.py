"""
The GPT of nanochat v1, in Flax NNX:
- rotary embeddings (split halves, base 10,000, tables rounded to bf16 as the reference does)
- QK norm, and param-free RMSNorm everywhere (after the embedding, before each sublayer, at the end)
- untied token embedding and lm_head, no biases
- ReLU² MLP, group-query attention (n_kv_head <= n_head)
- logits softcapped at 15 and computed in fp32; the loss never materialises all (B, T, V) logits,
  and its backward is fused into the forward (cross_entropy_sum)

Axis letters: B batch, T time, D model, H heads, K kv heads, Dh head dim, V vocab, F mlp hidden.
Parameters are fp32; `dtype` is the compute dtype (bf16 on GPU, fp32 on CPU). Every parameter
carries logical axis names (`axes` metadata) that nanochat_jax.sharding maps onto the mesh.
"""
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from nanochat_jax import kernels as pallas
from nanochat_jax.sharding import RULES, constrain


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be divisible by n_kv_head {self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim {self.n_embd // self.n_head} must be even for rotary embeddings")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def config_for_depth(depth, vocab_size=65536, sequence_len=2048, n_kv_head=None):
    """nanochat v1's single dial: width 64 per layer, heads of (about) 128 dims."""
    n_embd = depth * 64
    n_head = max(1, math.ceil(n_embd / 128))
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_kv_head or n_head, n_embd=n_embd)


def backend_settings():
    """Compute dtype and attention kernel for the default backend: bf16 + cuDNN on GPU, fp32 + XLA elsewhere."""
    on_gpu = jax.default_backend() == "gpu"
    return dict(dtype=jnp.bfloat16 if on_gpu else jnp.float32, attn_impl="cudnn" if on_gpu else "xla")


# -----------------------------------------------------------------------------
# Pure helpers

def norm(x):
    """RMSNorm with no learnable params, in fp32; eps is torch's default for fp32."""
    return (x.astype(jnp.float32) * pallas.rms_scale(x)[..., None]).astype(x.dtype)


def rotary_tables(positions, head_dim, base=10000.0):
    """cos, sin of shape (B, T, Dh/2) for integer positions (B, T), rounded to bf16 like nanochat's buffers."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    return jnp.cos(freqs).astype(jnp.bfloat16), jnp.sin(freqs).astype(jnp.bfloat16)


def apply_rotary_emb(x, cos, sin):
    """x: (B, T, N, Dh); cos/sin: (B or 1, T, Dh/2). Rotates the two halves of each head."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def softcap(logits, cap=pallas.CAP):
    return cap * jnp.tanh(logits / cap)


def token_losses(z, targets):
    """Per-token loss of the softcapped fp32 logits of lm_head outputs z (C, V); 0 where target == -1."""
    logits = softcap(z.astype(jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(targets >= 0, lse - target_logit, 0.0)


def _chunked(h, targets, vocab_size, chunk_tokens, weights=None):
    """h (N, D), targets (N,) and weights (N,) if given, padded (target -1, weight 0) and split into chunks of
    at most ~1 GiB of fp32 logits."""
    N, D = h.shape
    chunk = chunk_tokens or max(1, min(N, 2**28 // vocab_size))
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    out = (jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, D),
           jnp.pad(targets, (0, pad), constant_values=-1).reshape(n_chunks, chunk))
    return out if weights is None else out + (jnp.pad(weights, (0, pad)).reshape(n_chunks, chunk),)


def cross_entropy(h, lm_kernel, targets, chunk_tokens=None):
    """Per-token loss (N,) of h (N, D) against targets (N,), 0 where target == -1. The logits are built
    chunk by chunk, so at most (chunk, V) of them exist at once. For evaluation: see cross_entropy_sum
    for the loss that training differentiates."""
    hs, ts = _chunked(h, targets, lm_kernel.shape[1], chunk_tokens)
    w = lm_kernel.astype(h.dtype)
    losses = jax.lax.map(lambda args: token_losses(args[0] @ w, args[1]), (hs, ts))
    return losses.reshape(-1)[:h.shape[0]]


def cross_entropy_and_hits(h, lm_kernel, targets, max_logits=2**28):
    """Per-token loss (B, T) of hidden states h (B, T, D) against targets (B, T) (0 where the target is -1),
    and whether the argmax of the same logits is the target: what CORE's scoring needs. The logits are
    built a chunk of T at a time (at most max_logits of them at once, never (B, T, V)); each chunk keeps
    all B rows, so under a mesh every device computes only its own rows."""
    B, T, D = h.shape
    c = T
    while c % 2 == 0 and B * c * lm_kernel.shape[1] > max_logits:
        c //= 2
    w = lm_kernel.astype(h.dtype)

    def chunk(args):
        hc, tc = args  # (B, c, D), (B, c)
        logits = softcap((hc @ w).astype(jnp.float32))
        target_logit = jnp.take_along_axis(logits, jnp.maximum(tc, 0)[..., None], axis=-1)[..., 0]
        loss = jnp.where(tc >= 0, jax.nn.logsumexp(logits, axis=-1) - target_logit, 0.0)
        return loss, jnp.argmax(logits, axis=-1) == tc

    split = lambda x: jnp.swapaxes(x.reshape(B, T // c, c, *x.shape[2:]), 0, 1)  # (T / c, B, c, ...)
    losses, hits = jax.lax.map(chunk, (split(h), split(targets)))
    return jnp.swapaxes(losses, 0, 1).reshape(B, T), jnp.swapaxes(hits, 0, 1).reshape(B, T)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def cross_entropy_sum(h, lm_kernel, targets, weights=None, chunk_tokens=None, device_axes=(), kernel=None):
    """The summed loss of cross_entropy (weighted by weights (N,), if given: RL's advantages), with a fused
    backward: the forward pass of each chunk also takes the gradients of its logits and pushes them through
    lm_head at once, so the (chunk, V) logits are built once per step instead of twice (autodiff under
    jax.checkpoint rebuilt them in the backward), and only dh (N, D) and d(lm_head) (D, V) are kept for the
    backward pass. A sum has one cotangent for every token, which is what lets those gradients be taken
    before the cotangent is known. The weights get no gradient.
    device_axes: inside shard_map, the mesh axes over which h's rows are split; the loss and d(lm_head)
    are then summed over them (each once). kernel: a kernels.mode(), to take each chunk's losses and logit
    gradients from kernels.xent_chunk (one Pallas kernel) instead of XLA's passes over the fp32 logits."""
    losses = cross_entropy(h, lm_kernel, targets, chunk_tokens)
    return _psum((losses if weights is None else losses * weights).sum(), device_axes)


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def _cross_entropy_sum_fwd(h, lm_kernel, targets, weights, chunk_tokens, device_axes, kernel):
    N, D = h.shape
    chunks = _chunked(h, targets, lm_kernel.shape[1], chunk_tokens, weights)
    w = lm_kernel.astype(h.dtype)

    def chunk_step(dw, args):
        hc, tc, *wc = args  # (C, D), (C,), [(C,)]
        z = hc @ w  # (C, V) in the compute dtype, like torch autocast's lm_head output
        weight = wc[0] if wc else jnp.ones(tc.shape, jnp.float32)
        if kernel:
            losses, dz = pallas.xent_chunk(z, tc, weight, kernel == "interpret")
            loss = (losses * weight).sum()
        else:
            loss, dz = jax.value_and_grad(lambda z: (token_losses(z, tc) * weight).sum())(z)
        dw = dw + jnp.einsum("cd,cv->dv", hc, dz, preferred_element_type=jnp.float32)
        return dw, (loss, dz @ w.T)

    # zeros of d(lm_head)'s shape made from h's (empty) rows: inside shard_map they then carry h's
    # per-device type (the sum is over this device's rows), as the scan needs, on every JAX version
    dw = jnp.einsum("cd,cv->dv", chunks[0][0, :0], jnp.zeros((0, lm_kernel.shape[1]), h.dtype), preferred_element_type=jnp.float32)
    dw, (losses, dh) = jax.lax.scan(chunk_step, dw, chunks)
    dw = _psum(dw, device_axes)  # the one all-reduce of the loss's weight gradient
    return _psum(losses.sum(), device_axes), (dh.reshape(-1, D)[:N], dw.astype(lm_kernel.dtype), weights)


def _cross_entropy_sum_bwd(chunk_tokens, device_axes, kernel, residuals, g):
    dh, dw, weights = residuals
    no_grad = None if weights is None else jnp.zeros_like(weights)
    return (g * dh).astype(dh.dtype), g * dw, None, no_grad  # targets are integers; weights are data


cross_entropy_sum.defvjp(_cross_entropy_sum_fwd, _cross_entropy_sum_bwd)


def _row_axes():
    """(abstract mesh, the mesh axes that split a batch's rows), or no axes outside a mesh of several devices."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh, (() if mesh.empty else tuple(a for a in RULES["batch"] if mesh.shape[a] > 1))


def sharded_cross_entropy(h, lm_kernel, targets, chunk_tokens=None):
    """cross_entropy (per token, for evaluation) with each device looping over the chunks of its own rows only,
    for the reason sharded_cross_entropy_sum gives; the losses stay split over the devices like the rows."""
    mesh, axes = _row_axes()
    local = lambda h, w, t: cross_entropy(h, w, t, chunk_tokens)
    if not axes:
        return local(h, lm_kernel, targets)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes, None), P(), P(axes)), out_specs=P(axes),
                         axis_names=set(axes))(h, lm_kernel, targets)


def sharded_cross_entropy_sum(h, lm_kernel, targets, weights=None, kernels=False):
    """cross_entropy_sum with each device looping over the chunks of its own rows, under a mesh whose batch
    axes shard h (N, D) and targets (N,). Left to GSPMD, the chunk loop's axis inherits the row sharding and
    every device all-gathers h and computes every chunk (4x the loss work on 4 GPUs). Here each device
    sums its rows' losses and d(lm_head) locally, and one all-reduce adds them up. kernels: use the Pallas
    loss kernel where it runs (cross_entropy_sum's kernel)."""
    mesh, axes = _row_axes()
    kernel = kernel_mode(kernels and pallas.xent_supported(lm_kernel.shape[1]))
    if not axes:
        return cross_entropy_sum(h, lm_kernel, targets, weights, None, (), kernel)
    per_token = (targets,) if weights is None else (targets, weights)  # split over the devices like h's rows
    local = lambda h, w, t, *a: cross_entropy_sum(h, w, t, a[0] if a else None, None, axes, kernel)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes, None), P()) + (P(axes),) * len(per_token), out_specs=P(),
                         axis_names=set(axes), check_vma=kernel is None)(h, lm_kernel, *per_token)  # see on_rows


# -----------------------------------------------------------------------------
# Modules

E4M3_MAX, E5M2_MAX = 448.0, 57344.0  # the largest finite values of the two float8 formats


def to_fp8(a, dtype, max_value):
    """(a in float8, scale): a divided by the scale that maps its absolute max to max_value (tensorwise)."""
    amax = jnp.max(jnp.abs(a)).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / max_value, 1.0)
    return (a.astype(jnp.float32) / scale).astype(dtype), scale


def _scaled_dot(a, scale_a, b, scale_b, dims, dtype):
    return (jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32) * (scale_a * scale_b)).astype(dtype)


@jax.custom_vjp
def fp8_matmul(x, w):
    """x (..., i) @ w (i, o) as FP8 GEMMs (base_train --fp8): the forward in e4m3 x e4m3, the backward's two
    GEMMs with the gradient in e5m2 (more range, less precision, as torchao's float8 training does), every
    operand scaled by its absolute max, fp32 accumulation. Returns x's dtype; the gradients pass straight
    through the roundings, and w's comes back in w's dtype (the fp32 master weight)."""
    return _fp8_matmul_fwd(x, w)[0]


def _fp8_matmul_fwd(x, w):
    (qx, sx), (qw, sw) = to_fp8(x, jnp.float8_e4m3fn, E4M3_MAX), to_fp8(w, jnp.float8_e4m3fn, E4M3_MAX)
    zeros_like_w = jnp.zeros((0,), w.dtype)  # carries w's dtype to the backward
    return _scaled_dot(qx, sx, qw, sw, ((x.ndim - 1,), (0,)), x.dtype), (qx, sx, qw, sw, zeros_like_w)


def _fp8_matmul_bwd(residuals, g):
    qx, sx, qw, sw, zeros_like_w = residuals
    qg, sg = to_fp8(g, jnp.float8_e5m2, E5M2_MAX)
    lead = tuple(range(g.ndim - 1))
    dx = _scaled_dot(qg, sg, qw, sw, ((g.ndim - 1,), (1,)), g.dtype)  # (..., o) . (i, o) -> (..., i)
    dw = _scaled_dot(qx, sx, qg, sg, (lead, lead), zeros_like_w.dtype)  # (..., i) . (..., o) -> (i, o)
    return dx, dw


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


class Linear(nnx.Module):
    """y = x @ W without bias; W is kept fp32 and cast to the activation dtype for the matmul, or with fp8 both
    are quantized to float8 for it (fp8_matmul)."""

    def __init__(self, d_in, d_out, axes, init, *, rngs, fp8=False):
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), jnp.float32), axes=axes)
        self.fp8 = fp8

    def __call__(self, x):
        if self.fp8:
            return fp8_matmul(x, self.kernel[...])
        return x @ self.kernel[...].astype(x.dtype)


def dense(linear, x, transposed=False):
    """linear(x) for the KV-cache path; transposed: linear.kernel holds W.T, (d_out, d_in). Decoding one token
    (B = T = 1), XLA turns x @ W into a reduction over W's rows, which on an H100 reads W at about half
    the speed of the reduction along W.T's rows that this gives."""
    w = linear.kernel[...].astype(x.dtype)
    return jnp.einsum("...i,oi->...o", x, w) if transposed else x @ w


def uniform_init(d_model):
    s = math.sqrt(3) / math.sqrt(d_model)  # std 1/sqrt(d)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -s, s)


def zeros_init(key, shape, dtype):
    return jnp.zeros(shape, dtype)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config, *, attn_impl, rngs, fp8=False, kernels=()):
        D, H, K, Dh = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim, self.attn_impl = H, K, Dh, attn_impl
        self.kernels = "rope" in kernels and pallas.rope_qk_norm_supported(Dh)
        self.c_q = Linear(D, H * Dh, ("embed", "heads"), uniform_init(D), rngs=rngs, fp8=fp8)
        self.c_k = Linear(D, K * Dh, ("embed", "kv_heads"), uniform_init(D), rngs=rngs, fp8=fp8)
        self.c_v = Linear(D, K * Dh, ("embed", "kv_heads"), uniform_init(D), rngs=rngs, fp8=fp8)
        self.c_proj = Linear(H * Dh, D, ("heads", "embed"), zeros_init, rngs=rngs, fp8=fp8)

    def __call__(self, x, cos, sin, cache=None):
        """cache: None (training: causal over x), or (k, v, pos, layer, window, transposed, qkv): k and v (L, B, S, K, Dh)
        hold each row's first pos[b] tokens; x is written at pos[b].. of this layer and attends to everything
        up to itself, which must lie within the first `window` positions. transposed, qkv: how the kernels are held
        (see GPT.decode)."""
        B, T, _ = x.shape
        if cache is not None:
            return self._cached(x, cos, sin, cache)
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)  # (B, T, H, Dh)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, Dh)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        mode = kernel_mode(self.kernels)
        if mode:  # the same two steps in one Pallas kernel each way
            cs = [jnp.broadcast_to(c, (B, T, c.shape[-1])).reshape(B * T, -1) for c in (cos, sin)]
            rope_norm = lambda t, c, s: pallas.rope_qk_norm(t, c, s, mode == "interpret", pallas.ROPE_ROWS)
            q, k = (on_rows(rope_norm, t.reshape(B * T, *t.shape[2:]), *cs).reshape(t.shape) for t in (q, k))
        else:
            q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))  # QK norm after RoPE
        q, k, v = (constrain(t, "batch", None, "act_heads", None) for t in (q, k, v))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attn_impl)  # (B, T, H, Dh), GQA native
        return self.c_proj(y.reshape(B, T, self.n_head * self.head_dim)), None

    def _cached(self, x, cos, sin, cache):
        """The KV-cache path of __call__."""
        B, T, _ = x.shape
        k_cache, v_cache, pos, layer, window, transposed, qkv = cache  # caches (L, R, S, K, Dh) for all layers, updated in place
        H, K, Dh = self.n_head, self.n_kv_head, self.head_dim
        if qkv is None:
            q, k, v = (dense(lin, x, transposed) for lin in (self.c_q, self.c_k, self.c_v))
            fused = None
        else:  # c_q, c_k and c_v's kernels as one transposed matrix: one product reads all three
            fused = jnp.einsum("...i,oi->...o", x, qkv.astype(x.dtype))  # (B, T, (H + 2K) Dh)
            q, k, v = jnp.split(fused, [H * Dh, (H + K) * Dh], axis=-1)
        rows = pallas.DECODE_ATTENTION_ROWS
        mode = kernel_mode(rows is not None and B >= rows and T == 1 and fused is not None and pallas.decode_attention_supported(Dh, window))
        if mode:  # one kernel per layer for RoPE, QK norm, the cache write and attention, instead of XLA's ~15
            y, k_cache, v_cache = pallas.decode_attention(fused[:, 0], cos[:, 0], sin[:, 0], k_cache, v_cache, layer, pos, window,
                                                          mode == "interpret")
        else:
            q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
            q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))  # QK norm after RoPE
            # x is rows 0..B-1 of the cache's R >= B (the scheduler decodes only the rows in use); row b's tokens land
            # at pos[b].. (one scatter, in place: what a vmapped dynamic_update_slice becomes)
            where = (layer, jnp.arange(B)[:, None], pos[:, None] + jnp.arange(T)[None, :])
            write = lambda c, new: c.at[where].set(new.astype(c.dtype), mode="clip", unique_indices=True)
            k_cache, v_cache = write(k_cache, k), write(v_cache, v)
            # attend over the first `window` positions only: decoding reads what is filled, not the whole cache
            keys, values = k_cache[layer, :B, :window].astype(q.dtype), v_cache[layer, :B, :window].astype(q.dtype)  # (B, W, K, Dh)
            # query t of row b sits at pos[b] + t and sees keys 0..pos[b] + t: is_causal would align it at 0
            mask = jnp.arange(window)[None, None, :] <= (pos[:, None] + jnp.arange(T)[None, :])[:, :, None]  # (B, T, W)
            y = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None], implementation="xla")
        return dense(self.c_proj, y.reshape(B, T, H * Dh), transposed), (k_cache, v_cache)

    def with_suffixes(self, xp, cos_p, sin_p, xs, cos_s, sin_s, mask):
        """Attention for prefixes xp (B, P, D), causal as in __call__ (the same kernel), and for suffix tokens
        xs (B, S, D) that attend over the prefix's keys and their own as mask (B, S, P + S) allows.
        Returns both outputs (after c_proj)."""
        (B, P, _), S = xp.shape, xs.shape[1]

        def qkv(x, cos, sin):
            T = x.shape[1]
            q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
            k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
            v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
            q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
            return (constrain(t, "batch", None, "act_heads", None) for t in (q, k, v))

        qp, kp, vp = qkv(xp, cos_p, sin_p)
        yp = jax.nn.dot_product_attention(qp, kp, vp, is_causal=True, implementation=self.attn_impl)
        qs, ks, vs = qkv(xs, cos_s, sin_s)
        # few queries against P + S keys under an arbitrary mask: the plain XLA path, as decoding does
        keys, values = jnp.concatenate([kp, ks], axis=1), jnp.concatenate([vp, vs], axis=1)
        ys = jax.nn.dot_product_attention(qs, keys, values, mask=mask[:, None], implementation="xla")
        return (self.c_proj(yp.reshape(B, P, self.n_head * self.head_dim)),
                self.c_proj(ys.reshape(B, S, self.n_head * self.head_dim)))


class MLP(nnx.Module):
    def __init__(self, config, *, rngs, fp8=False, kernels=()):
        D = config.n_embd
        self.c_fc = Linear(D, 4 * D, ("embed", "mlp"), uniform_init(D), rngs=rngs, fp8=fp8)
        self.c_proj = Linear(4 * D, D, ("mlp", "embed"), zeros_init, rngs=rngs, fp8=fp8)
        self.kernels = "mlp" in kernels and not fp8  # the fused kernel is a bf16 GEMM

    def __call__(self, x):
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x))))  # ReLU²

    def normed(self, x):
        """self(norm(x)); with kernels, norm, c_fc and ReLU² are one Pallas GEMM (kernels.mlp_up)."""
        B, T, D = x.shape
        mesh, axes = _row_axes()
        local_rows = B * T // math.prod(mesh.shape[a] for a in axes)  # what each device's kernel sees (on_rows)
        mode = kernel_mode(self.kernels and pallas.mlp_up_supported(local_rows, D, self.c_fc.kernel.shape[1]))
        if not mode:
            return self(norm(x))
        up = lambda x, r, w: pallas.mlp_up(x, w, r, mode == "interpret")
        x = x.reshape(B * T, D)
        h = on_rows(up, x, pallas.rms_scale(x), shared=(self.c_fc.kernel[...].astype(x.dtype),))
        return self.c_proj(h.reshape(B, T, -1))


def kernel_mode(enabled):
    """kernels.mode() for a kernel that is switched on, else None; None too under a mesh with a tensor axis: arrays
    split over heads, MLP or vocab would leave GSPMD to partition a Pallas call, which it cannot (a kernel is only
    ever handed each device's own rows, by on_rows)."""
    mesh, axes = _row_axes()
    if not enabled or (not mesh.empty and math.prod(mesh.shape.values()) > math.prod(mesh.shape[a] for a in axes)):
        return None
    return pallas.mode()


def on_rows(fn, *rows, shared=()):
    """fn(*rows, *shared) for arrays split over the mesh's batch axes by their first dim (rows) and replicated
    ones (shared). A Pallas call has no partitioning rule (GSPMD would gather all of every input onto every
    device), so under a mesh of several devices each device runs fn on its own rows, inside shard_map. Its
    varying-across-devices check is off: a Pallas call's outputs carry no such type."""
    mesh, axes = _row_axes()
    if not axes:
        return fn(*rows, *shared)
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(axes),) * len(rows) + (P(),) * len(shared), out_specs=P(axes),
                         axis_names=set(axes), check_vma=False)(*rows, *shared)


class Block(nnx.Module):
    def __init__(self, config, *, attn_impl, rngs, fp8=False, kernels=()):
        self.attn = CausalSelfAttention(config, attn_impl=attn_impl, rngs=rngs, fp8=fp8, kernels=kernels)
        self.mlp = MLP(config, rngs=rngs, fp8=fp8, kernels=kernels)

    def decode_token(self, x, qkv, cos, sin, k_cache, v_cache, pos, layer, window, interpret=False, next_qkv=None):
        """__call__ on the KV-cache path for one token per row, x (B, D), cos/sin (B, Dh/2), in five kernels: the
        norm and QKV product, attention with the cache write (kernels.decode_attention), c_proj and the residual
        add, the norm, c_fc and ReLU², c_proj and the residual add (kernels.decode_linear); the attention's idle
        programs read the next products' weights into L2 meanwhile (and next_qkv, the next layer's). The Linear kernels
        must be held transposed, and qkv is the layer's fused QKV matrix (GPT.decode)."""
        linear = lambda x, w, **kw: pallas.decode_linear(x, w, interpret=interpret, **kw)
        proj, fc, mlp_proj = (w.astype(x.dtype) for w in (self.attn.c_proj.kernel[...], self.mlp.c_fc.kernel[...], self.mlp.c_proj.kernel[...]))
        next_weights = (proj, fc, mlp_proj) + (() if next_qkv is None else (next_qkv.astype(x.dtype),))
        y, k_cache, v_cache = pallas.decode_attention(linear(x, qkv.astype(x.dtype), norm=True), cos, sin, k_cache, v_cache,
                                                      layer, pos, window, interpret,
                                                      prefetch=next_weights[:pallas.DECODE_PREFETCH_WEIGHTS])
        x = linear(y.reshape(x.shape[0], -1), proj, residual=x)
        h = linear(x, fc, norm=True, relu2=True)
        return linear(h, mlp_proj, residual=x), k_cache, v_cache

    def __call__(self, x, cos, sin, cache=None):
        y, cache = self.attn(norm(x), cos, sin, cache)
        x = x + y
        x = x + self.mlp.normed(x)
        return constrain(x, "batch", None, None), cache


class GPT(nnx.Module):
    """Init is nanochat v1's: wte N(0,1), lm_head N(0,0.001), c_q/c_k/c_v/c_fc U(±sqrt(3/d)) (std 1/sqrt(d)),
    both output projections zero. fp8: the blocks' matmuls as FP8 GEMMs in training (fp8_matmul); the embedding,
    lm_head, the loss and the optimizer stay in higher precision, and the KV-cache path (dense) never uses it.
    kernels: names of the training path's Pallas kernels to use where they run (kernels.NAMES: "xent" the loss,
    "rope" RoPE + QK norm, "mlp" norm + c_fc + ReLU²); elsewhere, and in the KV-cache path, the plain code."""

    def __init__(self, config, *, dtype=jnp.float32, attn_impl="xla", remat=False, fp8=False, kernels=(), rngs):
        self.config, self.dtype, self.remat, self.kernels = config, dtype, remat, tuple(kernels)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, param_dtype=jnp.float32,
                             embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.wte.embedding.set_metadata(axes=("vocab_rows", "embed"))
        self.blocks = nnx.List([Block(config, attn_impl=attn_impl, rngs=rngs, fp8=fp8, kernels=kernels) for _ in range(config.n_layer)])
        self.lm_head = Linear(config.n_embd, config.vocab_size, ("embed", "vocab"),
                              nnx.initializers.normal(0.001), rngs=rngs)

    def features(self, idx):
        """Final normed hidden states (B, T, D) for token ids idx (B, T)."""
        B, T = idx.shape
        cos, sin = rotary_tables(jnp.arange(T)[None, :], self.config.head_dim)  # (1, T, Dh/2)
        x = norm(self.wte.embedding[...][idx].astype(self.dtype))  # (B, T, D)
        x = constrain(x, "batch", None, None)
        for block in self.blocks:
            x = nnx.remat(lambda blk, x: blk(x, cos, sin)[0])(block, x) if self.remat else block(x, cos, sin)[0]
        return norm(x)

    def decode(self, idx, k_cache, v_cache, pos, window=None, transposed=False, qkv=None):
        """Run idx (B, T) at positions pos[b].. against KV caches (L, R, S, K, Dh), whose first B rows are idx's
        (R >= B), with pos[b] + T <= S; returns the final normed hidden states (B, T, D) and the updated caches.
        One path for prefill (T > 1) and decoding (T = 1).
        window (static): attend over the first `window` cache positions, which must cover pos[b] + T.
        transposed (static): the blocks' Linear kernels hold W.T, (d_out, d_in), as the Engine keeps them.
        qkv: one array per layer, that layer's c_q, c_k and c_v kernels transposed and stacked ((H + 2K) Dh, D), used
        instead of the three (fused_qkv makes them)."""
        B, T = idx.shape
        window = window or k_cache.shape[2]
        cos, sin = rotary_tables(pos[:, None] + jnp.arange(T)[None, :], self.config.head_dim)  # (B, T, Dh/2), offset per row
        x = norm(self.wte.embedding[...][idx].astype(self.dtype))
        mode = self.decode_linear_mode(B, T, window, transposed, qkv)
        if mode:  # a few rows of one token: five kernels a layer
            x, cos, sin = x[:, 0], cos[:, 0], sin[:, 0]
            for i, block in enumerate(self.blocks):
                after = qkv[i + 1] if i + 1 < len(qkv) else None  # the next layer's QKV, for the attention's prefetch
                x, k_cache, v_cache = block.decode_token(x, qkv[i], cos, sin, k_cache, v_cache, pos, i, window, mode == "interpret", after)
            return norm(x)[:, None], k_cache, v_cache
        for i, block in enumerate(self.blocks):  # Block.__call__, with the kernels as they are held
            fused = None if qkv is None else qkv[i]
            y, (k_cache, v_cache) = block.attn(norm(x), cos, sin, (k_cache, v_cache, pos, i, window, transposed, fused))
            x = x + y
            h = jnp.square(jax.nn.relu(dense(block.mlp.c_fc, norm(x), transposed)))  # MLP.__call__
            x = constrain(x + dense(block.mlp.c_proj, h, transposed), "batch", None, None)
        return norm(x), k_cache, v_cache

    def decode_linear_mode(self, B, T, window, transposed, qkv):
        """Whether decode runs Block.decode_token (kernels.decode_linear and decode_attention) for B rows of T tokens:
        one token, at most kernels.DECODE_GEMV_ROWS rows, the engine's weights, where the kernels run."""
        c = self.config
        D, Dh, F = c.n_embd, c.head_dim, 4 * c.n_embd
        shapes = (((c.n_head + 2 * c.n_kv_head) * Dh, D), (D, c.n_head * Dh), (F, D), (D, F))
        return kernel_mode(T == 1 and B <= pallas.DECODE_GEMV_ROWS and transposed and qkv is not None
                           and pallas.decode_attention_supported(Dh, window)
                           and all(pallas.decode_linear_supported(*s) for s in shapes))

    def fused_qkv(self, dtype):
        """decode's qkv: per layer, [c_q; c_k; c_v] transposed, ((H + 2K) Dh, D), in dtype."""
        return [jnp.concatenate([lin.kernel[...].T for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v)]).astype(dtype)
                for b in self.blocks]

    def features_shared_prefix(self, prefix, prefix_len, suffix, suffix_pos, suffix_seg, scan_layers=False):
        """Final normed hidden states of several sequences per row that share a prefix, with the prefix run
        once: row b holds the prefix prefix[b, :prefix_len[b]] (padded to P) and, packed one after another in
        suffix (B, S), the continuations that follow it; suffix_seg (B, S) numbers the continuation each token
        belongs to (>= 0; each one contiguous and in order; -1 = padding) and suffix_pos (B, S) is its position
        in its own sequence (prefix_len[b] + its index in the continuation). A suffix token sees the prefix and
        the earlier tokens of its own continuation, which is exactly what it sees in the one sequence
        prefix + continuation, so its state is that sequence's (to rounding). The prefix takes the causal
        kernel of the training path; the suffix tokens, which are few, a masked XLA attention over P + S keys.
        scan_layers (static): run the blocks as one lax.scan over their stacked params: the same maths, compiled
        once instead of once per layer (unrolled, a d20 program took ~10 s to compile on an H200).
        Returns (prefix states (B, P, D), suffix states (B, S, D))."""
        B, P = prefix.shape
        S = suffix.shape[1]
        cos_p, sin_p = rotary_tables(jnp.arange(P)[None, :], self.config.head_dim)
        cos_s, sin_s = rotary_tables(suffix_pos, self.config.head_dim)
        sees_prefix = jnp.arange(P)[None, None, :] < prefix_len[:, None, None]  # (B, 1, P)
        same = (suffix_seg[:, :, None] == suffix_seg[:, None, :]) & (suffix_seg[:, :, None] >= 0)
        earlier = jnp.arange(S)[:, None] >= jnp.arange(S)[None, :]  # (S, S): key index <= query index
        sees_suffix = (same & earlier[None]) | jnp.eye(S, dtype=bool)[None]  # padding sees itself: no empty softmax
        mask = jnp.concatenate([sees_prefix & (suffix_seg >= 0)[:, :, None], sees_suffix], axis=-1)  # (B, S, P + S)
        embed = lambda ids: constrain(norm(self.wte.embedding[...][ids].astype(self.dtype)), "batch", None, None)

        def layer(block, xp, xs):  # Block.__call__ on both parts
            yp, ys = block.attn.with_suffixes(norm(xp), cos_p, sin_p, norm(xs), cos_s, sin_s, mask)
            xp, xs = xp + yp, xs + ys
            return constrain(xp + block.mlp(norm(xp)), "batch", None, None), constrain(xs + block.mlp(norm(xs)), "batch", None, None)

        xp, xs = embed(prefix), embed(suffix)
        if scan_layers:
            block_def = nnx.graphdef(self.blocks[0])
            stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *[nnx.state(block) for block in self.blocks])
            (xp, xs), _ = jax.lax.scan(lambda x, params: (layer(nnx.merge(block_def, params), *x), None), (xp, xs), stacked)
        else:
            for block in self.blocks:
                xp, xs = layer(block, xp, xs)
        return norm(xp), norm(xs)

    def logits(self, h):
        """Softcapped fp32 logits (..., V) of final hidden states (..., D)."""
        return softcap((h @ self.lm_head.kernel[...].astype(h.dtype)).astype(jnp.float32))

    def __call__(self, idx, targets=None, loss_reduction="mean", weights=None):
        """Logits (B, T, V) in fp32 without targets; with targets (-1 = ignore), the mean loss or,
        with loss_reduction='none', the per-token loss (B, T), or with weights (B, T) the weighted sum of
        the per-token losses (RL)."""
        h = self.features(idx)
        if targets is None:
            return self.logits(h)
        B, T, D = h.shape
        h, targets = h.reshape(B * T, D), targets.reshape(B * T)
        if weights is not None:
            return sharded_cross_entropy_sum(h, self.lm_head.kernel[...], targets, weights.reshape(B * T).astype(jnp.float32), "xent" in self.kernels)
        if loss_reduction == "none":
            return sharded_cross_entropy(h, self.lm_head.kernel[...], targets).reshape(B, T)
        return sharded_cross_entropy_sum(h, self.lm_head.kernel[...], targets, None, "xent" in self.kernels) / jnp.maximum((targets >= 0).sum(), 1)

    def num_params(self):
        return sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def estimate_flops(self):
        """FLOPs per token, nanochat's formula: 6·(N − N_wte) + 12·L·H·Dh·T (matmuls fwd+bwd, plus attention)."""
        c = self.config
        n_matmul = self.num_params() - self.wte.embedding.size
        return 6 * n_matmul + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
