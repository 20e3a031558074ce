"""
Pallas kernels for the memory-bound work XLA leaves between the cuBLAS GEMMs: in the train step (base_train
--kernels, bench train --kernels) and in the KV-cache engine's decoding. The train step's are custom_vjps whose
plain-JAX twin is the fallback:

- xent_chunk: the softcapped cross-entropy of one chunk of lm_head outputs z (C, V), its per-token loss and
  its gradient dz in one kernel. The fp32 logits live in registers only: z is read twice (the row's max and
  sum, then the gradient) and dz written once, instead of XLA's fp32 passes over (C, V).
- mlp_up: c_fc with the block's RMSNorm and ReLU² around it, y = relu(r * (x @ W))² where r is x's rms
  scale (param-free RMSNorm commutes with the matmul: norm(x) @ W = r * (x @ W)). The normed x, c_fc's
  output and its ReLU² are never written; only y is.
- rope_qk_norm: RoPE then RMSNorm over each head, q and k in one pass each way.

Decoding (inference only, no gradient):

- decode_attention: RoPE and QK norm of one new token per row, its key and value written into one layer's KV
  cache, and its queries against the filled positions (tensor-core dots over blocks of keys), in one kernel per
  layer instead of XLA's ~15. At batch 1 more programs of it read the next products' weights into L2.
- decode_linear: a product with one of a layer's weights for a few rows (a GEMV), with the RMSNorm before it,
  and the ReLU² or the residual add after it, inside. With decode_attention, a layer is five kernels.

The kernels lower through Triton on NVIDIA GPUs. `mode()` says how they run here: "triton", or None where
they cannot (CPU, other backends), and then the model keeps its plain path. Tests run the same kernels in
Pallas's interpreter (interpret=True, or NANOCHAT_JAX_PALLAS_INTERPRET=1 for the model) against the plain path,
values and gradients.
"""
import math
import os
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

EPS = float(jnp.finfo(jnp.float32).eps)  # RMSNorm's (model.norm uses rms_scale): torch's default for fp32
CAP = 15.0  # the logit softcap (model.softcap's default)


def mode():
    """"triton" on NVIDIA GPUs of compute capability 8.0 or newer (bf16 tensor cores), "interpret" where
    NANOCHAT_JAX_PALLAS_INTERPRET=1 asks for Pallas's interpreter (slow: for tests), else None (no kernels)."""
    if os.environ.get("NANOCHAT_JAX_PALLAS_INTERPRET") == "1":
        return "interpret"
    if jax.default_backend() == "gpu" and float(getattr(jax.devices()[0], "compute_capability", "0")) >= 8.0:
        return "triton"
    return None


NAMES = ("xent", "rope", "mlp")
DEFAULT = "xent,rope"  # the two that made the step faster on an H100 (docs/performance.md); mlp's GEMM did not


def add_flag(parser):
    parser.add_argument("--kernels", type=str, default=DEFAULT, help=f"Pallas kernels where they run (NVIDIA GPUs; "
                        f"elsewhere the plain path): a comma list of {','.join(NAMES)}, all, or '' for none")


def parse(spec):
    """--kernels: "all", "" (none) or a comma list of NAMES -> the tuple of names, in NAMES' order."""
    names = NAMES if spec == "all" else tuple(n for n in spec.split(",") if n)
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}: choose from {', '.join(NAMES)}, or all")
    return tuple(n for n in NAMES if n in names)


def rms_scale(x):
    """The per-row factor of model.norm, rsqrt(mean(x²) + eps), in fp32: norm(x) = rms_scale(x) * x."""
    x32 = x.astype(jnp.float32)
    return lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + EPS)


# -----------------------------------------------------------------------------
# Cross-entropy of a chunk of logits

def xent_reference(z, targets, weights):
    """Plain JAX, the model's own path: per-token loss (C,) of softcap(z) against targets (0 where target < 0),
    and the gradient of sum(loss * weights) with respect to z, in z's dtype."""
    from nanochat_jax.model import token_losses  # here: the model imports this module

    def total(z):
        losses = token_losses(z, targets)
        return (losses * weights).sum(), losses
    (_, losses), dz = jax.value_and_grad(total, has_aux=True)(z)
    return losses, dz


def _xent_row_kernel(z_ref, t_ref, w_ref, loss_ref, dz_ref, *, block):
    """One row: z_ref (V,), t_ref and w_ref scalars. Pass 1: online max and sum of exp, and the target's logit;
    pass 2: dz = w * (softmax - onehot) * softcap'."""
    n_blocks = z_ref.shape[0] // block
    t = t_ref[...]

    def capped(i):
        cols = i * block + jnp.arange(block)
        return cols, CAP * jnp.tanh(plgpu.load(z_ref.at[cols], eviction_policy="evict_last").astype(jnp.float32) / CAP)

    def stats(i, carry):
        m, s, target_logit = carry
        cols, x = capped(i)
        m_new = jnp.maximum(m, jnp.max(x))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new))
        return m_new, s, target_logit + jnp.sum(jnp.where(cols == t, x, 0.0))

    m, s, target_logit = lax.fori_loop(0, n_blocks, stats, (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.float32(0.0)))
    lse = m + jnp.log(s)
    valid = t >= 0
    loss_ref[...] = jnp.where(valid, lse - target_logit, 0.0)
    scale = jnp.where(valid, w_ref[...].astype(jnp.float32), 0.0)

    @pl.loop(0, n_blocks)
    def _(i):
        cols, x = capped(i)
        g = (jnp.exp(x - lse) - jnp.where(cols == t, 1.0, 0.0)) * (1.0 - (x / CAP) ** 2) * scale
        plgpu.store(dz_ref.at[cols], g.astype(dz_ref.dtype))


def _xent_block(V):
    return min(4096, V & -V)  # the largest power of 2 dividing V, at most 4096 (Triton blocks are powers of 2)


def xent_chunk(z, targets, weights, interpret=False):
    """(losses (C,) fp32, dz (C, V) in z's dtype) as xent_reference gives them, from one kernel per row."""
    C, V = z.shape
    block = _xent_block(V)
    kernel = pl.pallas_call(
        partial(_xent_row_kernel, block=block),
        out_shape=(jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((V,), z.dtype)),
        compiler_params=plgpu.CompilerParams(num_warps=min(8, max(1, block // 256)), num_stages=1),
        interpret=interpret, name="xent_row")
    return jax.vmap(kernel)(z, targets.astype(jnp.int32), weights.astype(jnp.float32))


def xent_supported(V):
    return _xent_block(V) >= 128


# -----------------------------------------------------------------------------
# c_fc with RMSNorm's scale and ReLU² fused in

def mlp_up_reference(x, w, r):
    """Plain JAX: relu(r[:, None] * (x @ w))² for x (M, K), w (K, N) in the compute dtype, r (M,) fp32."""
    a = jnp.dot(x, w, preferred_element_type=jnp.float32) * r[:, None]
    return jnp.square(jax.nn.relu(a)).astype(x.dtype)


def _mlp_up_kernel(x_ref, w_ref, r_ref, o_ref, *, bk):
    """One (BM, BN) tile of the output: the K loop on the tensor cores, then scale and ReLU² in registers."""
    def body(i, acc):
        ks = pl.ds(i * bk, bk)
        return acc + plgpu.dot(x_ref[:, ks], w_ref[ks, :])
    acc = lax.fori_loop(0, x_ref.shape[1] // bk, body, jnp.zeros(o_ref.shape, jnp.float32))
    a = acc * r_ref[...][:, None]
    o_ref[...] = jnp.square(jnp.maximum(a, 0.0)).astype(o_ref.dtype)


MLP_TILES = dict(bm=128, bn=256, bk=64, num_warps=8, num_stages=3)


def mlp_up_supported(M, K, N, tiles=MLP_TILES):
    return M % tiles["bm"] == 0 and N % tiles["bn"] == 0 and K % tiles["bk"] == 0


def _mlp_up_call(x, w, r, interpret=False, tiles=MLP_TILES):
    (M, K), N = x.shape, w.shape[1]
    bm, bn, bk = tiles["bm"], tiles["bn"], tiles["bk"]
    return pl.pallas_call(
        partial(_mlp_up_kernel, bk=bk),
        out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
        grid=(M // bm, N // bn),
        in_specs=[pl.BlockSpec((bm, K), lambda i, j: (i, 0)), pl.BlockSpec((K, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((bm,), lambda i, j: (i,))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"]),
        interpret=interpret, name="mlp_up")(x, w, r)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def mlp_up(x, w, r, interpret=False):
    """relu(r * (x @ w))² (mlp_up_reference) with the scale and ReLU² in the GEMM's epilogue. The backward is
    plain JAX from x, w, r and y alone: where y > 0, relu(a) = sqrt(y)."""
    return _mlp_up_call(x, w, r, interpret)


def _mlp_up_fwd(x, w, r, interpret):
    y = _mlp_up_call(x, w, r, interpret)
    return y, (x, w, r, y)


def _mlp_up_bwd(interpret, residuals, dy):
    x, w, r, y = residuals
    relu_a = jnp.sqrt(y.astype(jnp.float32))  # relu(r * u), u = x @ w
    da = dy.astype(jnp.float32) * 2.0 * relu_a
    du = (da * r[:, None]).astype(x.dtype)
    dr = jnp.sum(da * relu_a, axis=-1) / r  # sum(da * u): where da != 0, u = relu_a / r
    dx = jnp.dot(du, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.dot(x.T, du, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw, dr


mlp_up.defvjp(_mlp_up_fwd, _mlp_up_bwd)


# -----------------------------------------------------------------------------
# RoPE + QK norm

def rope_qk_norm_reference(x, cos, sin):
    """Plain JAX, the model's own path: RMSNorm(RoPE(x)) over each head for x (R, N, Dh) and cos/sin (R, Dh/2),
    in x's dtype (the rotation rounds to x's dtype first)."""
    from nanochat_jax.model import apply_rotary_emb, norm  # here: the model imports this module
    return norm(apply_rotary_emb(x[None], cos[None], sin[None])[0])


def _rope_norm_fwd_math(x1, x2, c, s):
    """The two halves of heads (..., Dh/2) and their cos/sin: normed rotated halves in fp32, and the rms factors."""
    y1 = (x1 * c + x2 * s).astype(jnp.float32)  # rounded to x's dtype first, like the reference's rotation
    y2 = (x2 * c - x1 * s).astype(jnp.float32)
    rstd = lax.rsqrt((jnp.sum(y1 * y1, axis=-1) + jnp.sum(y2 * y2, axis=-1)) / (2 * x1.shape[-1]) + EPS)
    return y1 * rstd[..., None], y2 * rstd[..., None], rstd


def _rope_norm_bwd_math(x1, x2, c, s, rstd, g1, g2):
    """The backward of _rope_norm_fwd_math: through the norm (with the saved rms factors), then the inverse rotation."""
    y1, y2 = (x1 * c + x2 * s).astype(jnp.float32), (x2 * c - x1 * s).astype(jnp.float32)
    g1, g2, rstd = g1.astype(jnp.float32), g2.astype(jnp.float32), rstd[..., None]
    mean_gy = (jnp.sum(g1 * y1, axis=-1) + jnp.sum(g2 * y2, axis=-1))[..., None] / (2 * x1.shape[-1])
    dy1 = rstd * g1 - rstd ** 3 * mean_gy * y1
    dy2 = rstd * g2 - rstd ** 3 * mean_gy * y2
    c32, s32 = c.astype(jnp.float32), s.astype(jnp.float32)
    return dy1 * c32 - dy2 * s32, dy1 * s32 + dy2 * c32


def _halves(ref, *idx):
    d = ref.shape[-1] // 2
    return ref[(*idx, slice(None, d))], ref[(*idx, slice(d, None))]


def _store_halves(ref, idx, a, b):
    d = ref.shape[-1] // 2
    ref[(*idx, slice(None, d))] = a.astype(ref.dtype)
    ref[(*idx, slice(d, None))] = b.astype(ref.dtype)


def _rope_fwd_kernel(x_ref, cos_ref, sin_ref, o_ref, rstd_ref, *, heads):
    """heads=None: one head of one token, x_ref (Dh,), cos/sin (Dh/2,). Else a block of tokens, x_ref (rows, N, Dh),
    cos/sin (rows, Dh/2), one head at a time."""
    c, s = cos_ref[...], sin_ref[...]
    for idx in ([()] if heads is None else [(slice(None), h) for h in range(heads)]):
        x1, x2 = _halves(x_ref, *idx)
        y1, y2, rstd = _rope_norm_fwd_math(x1, x2, c.astype(x1.dtype), s.astype(x1.dtype))
        _store_halves(o_ref, idx, y1, y2)
        rstd_ref[idx if idx else ...] = rstd


def _rope_bwd_kernel(x_ref, cos_ref, sin_ref, rstd_ref, g_ref, dx_ref, *, heads):
    c, s = cos_ref[...], sin_ref[...]
    for idx in ([()] if heads is None else [(slice(None), h) for h in range(heads)]):
        x1, x2 = _halves(x_ref, *idx)
        dx1, dx2 = _rope_norm_bwd_math(x1, x2, c.astype(x1.dtype), s.astype(x1.dtype), rstd_ref[idx if idx else ...],
                                       *_halves(g_ref, *idx))
        _store_halves(dx_ref, idx, dx1, dx2)


def rope_qk_norm_supported(Dh):
    return Dh & (Dh - 1) == 0 and Dh >= 32  # half a head is one load: a power of 2


ROPE_ROWS = None  # tokens per program: None = one program per (token, head), the layout measured on the H100


def _rope_call(kernel, x, cos, sin, *per_head, out_shape, interpret, rows, name):
    """kernel over x (R, N, Dh) with cos/sin (R, Dh/2) and per_head arrays (R, N[, Dh]): one program per
    (token, head), mapped over both, or (rows) one program per block of `rows` tokens, looping over the heads."""
    R, N, Dh = x.shape
    params = plgpu.CompilerParams(num_warps=1 if rows is None else 4, num_stages=1)
    if rows is None or R % rows:
        call = pl.pallas_call(partial(kernel, heads=None), out_shape=jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape[2:], o.dtype), out_shape),
                              compiler_params=params, interpret=interpret, name=name)
        return jax.vmap(jax.vmap(call, in_axes=(0, None, None) + (0,) * len(per_head)))(x, cos, sin, *per_head)
    block = lambda a: pl.BlockSpec((rows, *a.shape[1:]), lambda i: (i,) + (0,) * (a.ndim - 1))
    return pl.pallas_call(partial(kernel, heads=N), out_shape=out_shape, grid=(R // rows,),
                          in_specs=[block(a) for a in (x, cos, sin, *per_head)],
                          out_specs=jax.tree.map(block, out_shape), compiler_params=params, interpret=interpret,
                          name=name)(x, cos, sin, *per_head)


def _rope_fwd_call(x, cos, sin, interpret, rows):
    out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape[:2], jnp.float32))
    return _rope_call(_rope_fwd_kernel, x, cos, sin, out_shape=out_shape, interpret=interpret, rows=rows, name="rope_qk_norm")


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def rope_qk_norm(x, cos, sin, interpret=False, rows=None):
    """rope_qk_norm_reference for x (R, N, Dh), cos/sin (R, Dh/2), in one kernel each way (programs as _rope_call);
    cos and sin get no gradient (they are functions of the positions)."""
    return _rope_fwd_call(x, cos, sin, interpret, rows)[0]


def _rope_qk_norm_fwd(x, cos, sin, interpret, rows):
    y, rstd = _rope_fwd_call(x, cos, sin, interpret, rows)
    return y, (x, cos, sin, rstd)


def _rope_qk_norm_bwd(interpret, rows, residuals, g):
    x, cos, sin, rstd = residuals
    dx = _rope_call(_rope_bwd_kernel, x, cos, sin, rstd, g, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                    interpret=interpret, rows=rows, name="rope_qk_norm_bwd")
    return dx, jnp.zeros_like(cos), jnp.zeros_like(sin)


rope_qk_norm.defvjp(_rope_qk_norm_fwd, _rope_qk_norm_bwd)


# -----------------------------------------------------------------------------
# Decoding: one token per row, five kernels a layer

def decode_attention_reference(qkv, cos, sin, k_cache, v_cache, layer, pos, window):
    """Plain JAX, the model's KV-cache path for one new token per row: qkv (B, (H + 2K) Dh) is the fused QKV
    product of row b's token at pos[b] (queries, then keys, then values), cos/sin (B, Dh/2) its rotary tables.
    RoPE and QK norm, the new key and value written at pos[b] of cache `layer` (caches (L, R, S, K, Dh), R >= B),
    and the query over keys 0..pos[b] read through the first `window` positions (GQA: head h reads kv head
    h // (H // K)). Returns (y (B, H, Dh) in qkv's dtype, k_cache, v_cache)."""
    from nanochat_jax.model import apply_rotary_emb, norm  # here: the model imports this module
    (B, _), (K, Dh) = qkv.shape, k_cache.shape[3:]
    q, k, v = jnp.split(qkv[:, None], [qkv.shape[1] - 2 * K * Dh, qkv.shape[1] - K * Dh], axis=-1)
    q, k, v = q.reshape(B, 1, -1, Dh), k.reshape(B, 1, K, Dh), v.reshape(B, 1, K, Dh)
    q, k = norm(apply_rotary_emb(q, cos[:, None], sin[:, None])), norm(apply_rotary_emb(k, cos[:, None], sin[:, None]))
    write = lambda c, new: c.at[layer, jnp.arange(B), pos].set(new[:, 0].astype(c.dtype), mode="clip", unique_indices=True)
    k_cache, v_cache = write(k_cache, k), write(v_cache, v)
    keys, values = k_cache[layer, :B, :window].astype(q.dtype), v_cache[layer, :B, :window].astype(q.dtype)  # (B, W, K, Dh)
    mask = jnp.arange(window)[None, :] <= pos[:, None]  # (B, W)
    y = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None, None], implementation="xla")
    return y[:, 0], k_cache, v_cache


def _rope_norm_head(qkv_ref, b, head, c, s, swap):
    """One head of row b's QKV product, whole: RoPE (each dim with its partner in the other half, `swap`, loaded from
    memory: Triton permutes no registers; s carries the second half's minus sign), then RMSNorm in fp32, rounded to
    the compute dtype as the model's path rounds it."""
    Dh = swap.shape[0]
    x, partner = qkv_ref[b, pl.ds(head * Dh, Dh)], qkv_ref[b, head * Dh + swap]
    y = (x * c + partner * s).astype(jnp.float32)  # rounded to x's dtype first, like the reference's rotation
    y = y * lax.rsqrt(jnp.sum(y * y) / Dh + EPS)
    return y.astype(qkv_ref.dtype).astype(jnp.float32)


def _blocks_by_sums(qs, load, valid_at, n, block, scale):
    """The online softmax of each query head q (Dh,) over the blocks of keys, on the CUDA cores: the scores and the
    output are multiplies and sums in fp32. Returns each head's (max, sum, output) before the new key."""
    def body(i, carry):
        valid = valid_at(i)
        keys, values = load(i, True).astype(jnp.float32), load(i, False).astype(jnp.float32)
        out = []
        for q, (m, l, acc) in zip(qs, carry):
            sc = jnp.where(valid, jnp.sum(keys * q[None, :], axis=1) * scale, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(sc))  # finite from the first block on: it holds key 0
            alpha, p = jnp.exp(m - m_new), jnp.exp(sc - m_new)
            out.append((m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * values, axis=0)))
        return tuple(out)

    Dh = qs[0].shape[0]
    start = tuple((jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((Dh,), jnp.float32)) for _ in qs)
    return lax.fori_loop(0, pl.cdiv(n, block), body, start)


def _blocks_by_dots(qs, load, valid_at, n, block, scale, dtype):
    """The same on the tensor cores: the group's query heads as the rows of a (G, Dh) matrix, G >= 16 (a dot's
    least; rows past the group are 0 and their results unused), the scores a dot with the block's keys and the
    output one of the probabilities, rounded to the compute dtype, with its values; fp32 accumulation."""
    Dh, G = qs[0].shape[0], max(16, pl.next_power_of_2(len(qs)))
    rows = jnp.arange(G)
    Q = sum(jnp.where((rows == g)[:, None], q[None, :], 0.0) for g, q in enumerate(qs)).astype(dtype)  # q is exact in dtype
    prec = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    dot = lambda a, b, contract: lax.dot_general(a, b, (contract, ((), ())), precision=prec, preferred_element_type=jnp.float32)

    def body(i, carry):
        m, l, acc = carry
        sc = jnp.where(valid_at(i)[None, :], dot(Q, load(i, True), ((1,), (1,))) * scale, -jnp.inf)  # (G, block)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha, p = jnp.exp(m - m_new), jnp.exp(sc - m_new[:, None])
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + dot(p.astype(dtype), load(i, False), ((1,), (0,)))

    start = jnp.full((G,), -jnp.inf, jnp.float32), jnp.zeros((G,), jnp.float32), jnp.zeros((G, Dh), jnp.float32)
    m, l, acc = lax.fori_loop(0, pl.cdiv(n, block), body, start)
    row = lambda x, g: jnp.sum(jnp.where(rows == g, x, 0.0)) if x.ndim == 1 else jnp.sum(jnp.where((rows == g)[:, None], x, 0.0), axis=0)
    return tuple((row(m, g), row(l, g), row(acc, g)) for g in range(len(qs)))


def _attend(qkv_ref, cos_ref, sin_ref, k_ref, v_ref, pos_ref, y_ref, k_out, v_out, b, j, *, layer, window, block, dots):
    """Row b, kv head j: the new key and value stored at pos[b] of the aliased caches, then keys 0..pos[b]-1 of
    `layer` streamed through an online softmax a block at a time (_blocks_by_dots, or _blocks_by_sums), each block
    loaded once for the group's query heads, and the new key last, from registers."""
    K, Dh = k_ref.shape[3], k_ref.shape[4]
    H, d, dtype = qkv_ref.shape[1] // Dh - 2 * K, Dh // 2, qkv_ref.dtype
    group = H // K
    pos = pos_ref[b]
    layer = jnp.int32(layer)  # an array index: the interpreter's masked load takes no Python int beside traced ones
    dims = jnp.arange(Dh)
    swap, half = (dims + d) % Dh, dims % d
    c, s = cos_ref[b, half].astype(dtype), sin_ref[b, half].astype(dtype)
    s = jnp.where(dims < d, s, -s)  # y1 = x1 c + x2 s, y2 = x2 c - x1 s

    k_new = _rope_norm_head(qkv_ref, b, H + j, c, s, swap)
    v_new = qkv_ref[b, pl.ds((H + K + j) * Dh, Dh)].astype(jnp.float32)
    k_out[layer, b, pos, j, :] = k_new.astype(k_out.dtype)
    v_out[layer, b, pos, j, :] = v_new.astype(v_out.dtype)
    qs = [_rope_norm_head(qkv_ref, b, j * group + g, c, s, swap) for g in range(group)]
    n = jnp.minimum(pos, window)  # cached keys this row sees: the reference's mask, also for a pos past the window
    valid_at = lambda i: i * block + jnp.arange(block) < n

    def load(i, keys):  # (block, Dh) in the compute dtype; the tail past the filled keys reads as 0 whatever the cache holds
        x = plgpu.load((k_ref if keys else v_ref).at[layer, b, pl.ds(i * block, block), j, :], mask=valid_at(i)[:, None], other=0)
        return x.astype(dtype)  # rounded to the compute dtype first, as the reference does

    scale = 1.0 / math.sqrt(Dh)
    blocks = _blocks_by_dots(qs, load, valid_at, n, block, scale, dtype) if dots else _blocks_by_sums(qs, load, valid_at, n, block, scale)
    for g, (q, (m, l, acc)) in enumerate(zip(qs, blocks)):
        sc = jnp.where(pos < window, jnp.sum(q * k_new) * scale, -jnp.inf)  # the new key, inside the window
        m_new = jnp.maximum(m, sc)
        alpha, p = jnp.exp(m - m_new), jnp.exp(sc - m_new)
        y_ref[b, j * group + g, :] = ((acc * alpha + p * v_new) / (l * alpha + p)).astype(y_ref.dtype)


def _prefetch(weights, sink_ref, part, parts, tile):
    """Program `part` of `parts` reads every parts-th tile of the flat weights into L2 (evict last: a later kernel
    reads them), summing them into sink_ref[part] so that the loads are not dropped as dead."""
    acc = jnp.zeros((tile,), jnp.float32)
    for w in weights:
        n = w.shape[0]

        def body(i, acc, w=w, n=n):
            at = (part + i * parts) * tile + jnp.arange(tile)
            x = plgpu.load(w.at[pl.ds((part + i * parts) * tile, tile)], mask=at < n, other=0, eviction_policy="evict_last")
            return acc + x.astype(jnp.float32)
        acc = lax.fori_loop(0, pl.cdiv(pl.cdiv(n, tile) - part, parts), body, acc)
    sink_ref[part] = jnp.sum(acc)


def _decode_attention_kernel(qkv_ref, cos_ref, sin_ref, k_ref, v_ref, pos_ref, *rest, layer, window, block, dots, tile):
    """Programs (b, j < K) attend (_attend); with weights to prefetch, programs (b, j >= K) read them into L2 while
    the few attention programs leave the rest of the GPU idle (batch 1: 10 programs on 132 SMs)."""
    b, j = pl.program_id(0), pl.program_id(1)
    n_w = len(rest) - 4 if tile else 0
    weights, (y_ref, k_out, v_out), sink = rest[:n_w], rest[n_w:n_w + 3], rest[n_w + 3:]
    attend = partial(_attend, qkv_ref, cos_ref, sin_ref, k_ref, v_ref, pos_ref, y_ref, k_out, v_out, b, j,
                     layer=layer, window=window, block=block, dots=dots)
    if not tile:
        return attend()
    K, extra = k_ref.shape[3], pl.num_programs(1) - k_ref.shape[3]
    pl.when(j < K)(attend)
    pl.when(j >= K)(lambda: _prefetch(weights, sink[0], b * extra + j - K, pl.num_programs(0) * extra, tile))


# decode_attention's keys per loop step (at most the window), warps and pipeline stages (bench decode --decode-block,
# --decode-warps, --decode-stages). One H100, d20, batch 128, by dots: 2.01 ms a step; keys 128 2.03, 32 2.14; warps
# 8 2.13 (round four's kernel, by sums over halves of heads: 2.33; keys 128 2.30, 32 2.33; warps 8 2.53, 2 2.31)
DECODE_BLOCK, DECODE_WARPS, DECODE_STAGES = 64, 4, 2
# decode_attention's scores and output as tensor-core dots (blocks and heads of at least 16), else sums on the CUDA
# cores (bench decode --decode-dots 0). One H100, d20: batch 128 2.15 ms a step against 2.27 (and 2.35 with the
# previous kernel, halves of heads), batch 1 0.82 against 0.84
DECODE_DOTS = True
# The KV-cache path uses decode_attention for batches of at least this many rows, where it runs (None: never;
# bench decode --decode-kernel-rows), and always with decode_linear. One H100, d20, a 256-position window, a step
# against XLA's attention: 32 rows 1.31 / 1.50 ms, 128 rows 2.38 / 2.62.
DECODE_ATTENTION_ROWS = 32


# At batch 1 the attention is 10 programs on 132 SMs, latency-bound, while the rest of the GPU waits: programs added to
# its grid read the layer's next weights into L2 meanwhile (the attention c_proj, then c_fc, the MLP c_proj, the next
# layer's QKV: the first DECODE_PREFETCH_WEIGHTS of them), DECODE_PREFETCH programs in all, tiles of PREFETCH_TILE.
# Only on the five-kernel path (at most DECODE_GEMV_ROWS rows). bench decode --decode-prefetch, --decode-prefetch-weights.
# One H100, d20, batch 1: 0.73 ms a step; no prefetch 0.78, 128 programs 0.82 (with 256 candidates), 512 0.74;
# one weight 0.76, three 0.78-0.80, four 1.04: more than c_proj and c_fc outlasts the attention
DECODE_PREFETCH, DECODE_PREFETCH_WEIGHTS, PREFETCH_TILE = 256, 2, 4096


def decode_attention_supported(Dh, window, block=None):
    """Triton loads powers of 2: a head (Dh,) and a block of keys (block, Dh), blocks tiling the window."""
    block = min(block or DECODE_BLOCK, window)
    return Dh & (Dh - 1) == 0 and Dh >= 2 and block & (block - 1) == 0 and window % block == 0


def decode_attention(qkv, cos, sin, k_cache, v_cache, layer, pos, window, interpret=False, block=None, prefetch=()):
    """decode_attention_reference in one kernel, one program per (row, kv head): B * K programs, each reading its
    kv head of `layer` straight from the full caches (L, R, S, K, Dh), positions 0..pos[b] only, the softmax and its
    sums in fp32, and writing its new key and value into the caches in place (aliased: the caller's are donated)
    and its H // K query heads of the (B, H, Dh) output in qkv's dtype. layer and window are static. prefetch:
    weights the next kernels read, which DECODE_PREFETCH more programs read into L2 meanwhile."""
    B = qkv.shape[0]
    K, Dh = k_cache.shape[3:]
    H = qkv.shape[1] // Dh - 2 * K
    block = min(block or DECODE_BLOCK, window)
    extra = -(-DECODE_PREFETCH // B) if prefetch and DECODE_PREFETCH else 0
    weights = tuple(w.reshape(-1) for w in prefetch) if extra else ()  # flat: a reshape of the whole array, no copy
    sink = (jax.ShapeDtypeStruct((B * extra,), jnp.float32),) if extra else ()
    # no BlockSpecs: every input is passed whole, so XLA copies no slice of the caches before the call
    y, k_cache, v_cache, *_ = pl.pallas_call(
        partial(_decode_attention_kernel, layer=layer, window=window, block=block, dots=DECODE_DOTS and block >= 16 and Dh >= 16,
                tile=PREFETCH_TILE if extra else 0),
        out_shape=(jax.ShapeDtypeStruct((B, H, Dh), qkv.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype), *sink),
        grid=(B, K + extra), input_output_aliases={3: 1, 4: 2},
        compiler_params=plgpu.CompilerParams(num_warps=DECODE_WARPS, num_stages=DECODE_STAGES),
        interpret=interpret, name="decode_attention")(qkv, cos, sin, k_cache, v_cache, pos.astype(jnp.int32), *weights)
    return y, k_cache, v_cache


def decode_linear_reference(x, w, norm=False, relu2=False, residual=None):
    """Plain JAX, the KV-cache path's products for rows x (B, K) and a transposed weight w (N, K) in the compute
    dtype: x RMS-normed first (norm), the product's ReLU² (relu2), or the product added to residual (B, N)."""
    from nanochat_jax.model import norm as rms_norm
    y = jnp.einsum("bi,oi->bo", rms_norm(x) if norm else x, w)
    y = jnp.square(jax.nn.relu(y)) if relu2 else y
    return y if residual is None else residual + y


def _gemv_kernel(x_ref, w_ref, *rest, bn, bk, norm, relu2, weights_first):
    """BN outputs of every row: the weight's (BN, K) rows streamed in (BN, BK) tiles, each loaded once for all
    rows (few: one at a time, multiplies and sums on the CUDA cores; a tensor-core dot needs 16). The loops are
    Python loops, unrolled, so every tile's load can be issued before the first sum waits on it. weights_first:
    write every tile's load before x's loads and the norm's sums, which they do not wait on."""
    residual_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    (B, K), dtype = x_ref.shape, x_ref.dtype
    cols = pl.ds(pl.program_id(0) * bn, bn)
    chunks = [pl.ds(i * bk, bk) for i in range(K // bk)]
    load_w = lambda ch: plgpu.load(w_ref.at[cols, ch], eviction_policy="evict_first")  # read once: keep x in L2
    ws = [load_w(ch) for ch in chunks] if weights_first else None
    xs = [[x_ref[b, ch] for ch in chunks] for b in range(B)]
    if norm:  # RMSNorm each row in fp32 and round it to the compute dtype, as model.norm does, before the product
        for b in range(B):
            r = lax.rsqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in xs[b]) / K + EPS)
            xs[b] = [(x.astype(jnp.float32) * r).astype(dtype) for x in xs[b]]
    acc = [jnp.zeros((bn,), jnp.float32) for _ in range(B)]
    for i, ch in enumerate(chunks):
        w = (ws[i] if weights_first else load_w(ch)).astype(jnp.float32)
        acc = [a + jnp.sum(w * xs[b][i].astype(jnp.float32)[None, :], axis=1) for b, a in enumerate(acc)]
    for b in range(B):
        y = acc[b].astype(dtype).astype(jnp.float32)  # the product's rounding, then the epilogue's
        if relu2:
            y = jnp.square(jnp.maximum(y, 0.0))
        if residual_ref is not None:
            y = residual_ref[b, cols].astype(jnp.float32) + y
        o_ref[b, cols] = y.astype(o_ref.dtype)


# Tiles: a (BN, BK) tile of GEMV_TILE elements, BN as large as leaves at least GEMV_PROGRAMS programs (an H100 has
# 132 SMs: two or more programs on each keep its loads in flight). bench decode --gemv-tile/--gemv-programs; on
# one H100 at d20, batch 1: 256 programs 0.89 ms a step, 128 0.97, 512 0.88, 1024 0.91 and 2048 1.05 (the last two
# with tiles of 8192); tiles of 2048 0.98, of 8192 0.88.
GEMV_TILE, GEMV_PROGRAMS = 4096, 256
# The KV-cache path decodes batches of at most this many rows with decode_linear (0: never; bench decode
# --decode-gemv-rows): its products one kernel each, with the norms, ReLU² and residual adds inside. One H100,
# d20, a step against XLA's path: 1 row 0.89 / 1.06 ms, 2 rows 0.99 / 1.25, 4 rows 1.20 / 1.23, 8 rows 2.26 / 1.22
# (each row's sums are separate CUDA-core work: from 8 rows on cuBLAS's GEMMs win).
DECODE_GEMV_ROWS = 4
# _gemv_kernel's weights_first (bench decode --gemv-weights-first) and warps per program (--gemv-warps). One H100,
# d20, batch 1: weights first 0.83 ms a step, against 0.83-0.84 (the same); 8 warps 0.86, 2 warps 0.89
GEMV_WEIGHTS_FIRST, GEMV_WARPS = False, 4


def gemv_tiles(N, K, tile=None, programs=None):
    """(BN, BK) for a product of N outputs over K inputs: powers of 2 dividing N and K; None if there are none."""
    tile, programs = tile or GEMV_TILE, programs or GEMV_PROGRAMS
    bn = 1
    while N % (2 * bn) == 0 and N // (2 * bn) >= programs and 2 * bn * 16 <= tile:
        bn *= 2
    bk = K & -K  # the largest power of 2 dividing K
    while bk * bn > tile:
        bk //= 2
    return (bn, bk) if bk >= 16 else None


def decode_linear_supported(N, K):
    return gemv_tiles(N, K) is not None


def decode_linear(x, w, norm=False, relu2=False, residual=None, interpret=False):
    """decode_linear_reference in one kernel: norm, the product with w (N, K) (a (d_out, d_in) kernel, as the engine
    holds them), and ReLU² or the residual add, for a few rows x (B, K); the result (B, N) in x's dtype."""
    (B, K), N = x.shape, w.shape[0]
    bn, bk = gemv_tiles(N, K)
    args = (x, w) if residual is None else (x, w, residual)
    return pl.pallas_call(
        partial(_gemv_kernel, bn=bn, bk=bk, norm=norm, relu2=relu2, weights_first=GEMV_WEIGHTS_FIRST),
        out_shape=jax.ShapeDtypeStruct((B, N), x.dtype), grid=(N // bn,),
        compiler_params=plgpu.CompilerParams(num_warps=GEMV_WARPS, num_stages=1),
        interpret=interpret, name="decode_linear")(*args)
