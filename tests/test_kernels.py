"""The Pallas kernels against their plain-JAX twins, values and gradients. On a GPU they run as Triton kernels;
elsewhere in Pallas's interpreter, which runs the same kernel code. Tolerances are bf16's (the kernels
round where the plain path rounds, but in a different order) and stated relative to each tensor's scale, so
no CPU's own rounding decides a result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import kernels
from nanochat_jax.model import GPT, GPTConfig

INTERPRET = jax.default_backend() != "gpu"


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def lower_for_cuda(f, *args):
    """f's StableHLO for CUDA, lowered here without a GPU: Pallas's Triton lowering of every kernel in it runs."""
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(f, *args):
    return lower_for_cuda(f, *args).count("xla.gpu.triton")


def test_parse_names_the_kernels():
    assert kernels.parse("all") == kernels.NAMES
    assert kernels.parse("") == ()
    assert kernels.parse("mlp,xent") == ("xent", "mlp")
    with pytest.raises(ValueError, match="unknown kernels.*'relu'"):
        kernels.parse("xent,relu")


def test_xent_chunk_matches_autodiff_of_the_softcapped_loss():
    C, V = 16, 2048
    k = jax.random.split(jax.random.key(0), 3)
    z = (jax.random.normal(k[0], (C, V)) * 20).astype(jnp.bfloat16)  # past the softcap: tanh matters
    targets = jax.random.randint(k[1], (C,), 0, V).at[3].set(-1)  # one ignored token
    weights = jax.random.uniform(k[2], (C,), minval=-1.0, maxval=2.0)  # RL's advantages can be negative
    losses, dz = kernels.xent_chunk(z, targets, weights, interpret=INTERPRET)
    want_losses, want_dz = kernels.xent_reference(z, targets, weights)
    assert dz.dtype == z.dtype and losses.shape == (C,)
    assert rel_err(losses, want_losses) < 1e-5
    assert rel_err(dz, want_dz) < 1e-2  # one bf16 rounding of each gradient
    assert float(losses[3]) == 0.0 and not np.asarray(dz[3], np.float32).any()  # ignored: no loss, no gradient


def test_mlp_up_is_norm_cfc_relu2_with_its_gradients():
    M, K, N = 256, 128, 256
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (M, K)).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], (K, N)) / np.sqrt(K)).astype(jnp.bfloat16)
    probe = jax.random.normal(k[2], (M, N))  # a cotangent that differs everywhere

    def loss(fn):
        return lambda x, w: (fn(x, w, kernels.rms_scale(x)).astype(jnp.float32) * probe).sum()
    fused = lambda x, w, r: kernels.mlp_up(x, w, r, INTERPRET)
    assert rel_err(fused(x, w, kernels.rms_scale(x)), kernels.mlp_up_reference(x, w, kernels.rms_scale(x))) < 1e-2
    got, want = jax.grad(loss(fused), (0, 1))(x, w), jax.grad(loss(kernels.mlp_up_reference), (0, 1))(x, w)
    for g, r in zip(got, want):  # dx includes the path through the rms scale
        assert g.dtype == r.dtype and rel_err(g, r) < 2e-2


@pytest.mark.parametrize("rows", [None, 16])  # one program per (token, head), or per block of 16 tokens
def test_rope_qk_norm_matches_rotation_then_norm(rows):
    R, N, Dh = 32, 3, 64
    k = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k[0], (R, N, Dh)).astype(jnp.bfloat16)
    angles = jax.random.uniform(k[1], (R, Dh // 2), maxval=6.0)
    cos, sin = jnp.cos(angles).astype(jnp.bfloat16), jnp.sin(angles).astype(jnp.bfloat16)
    probe = jax.random.normal(k[2], (R, N, Dh))
    fused = lambda x: kernels.rope_qk_norm(x, cos, sin, INTERPRET, rows)
    plain = lambda x: kernels.rope_qk_norm_reference(x, cos, sin)
    assert rel_err(fused(x), plain(x)) < 1e-2
    np.testing.assert_allclose(np.mean(np.asarray(fused(x), np.float32) ** 2, -1), 1.0, rtol=2e-2)  # unit rms per head
    grad = lambda f: jax.grad(lambda x: (f(x).astype(jnp.float32) * probe).sum())(x)
    assert rel_err(grad(fused), grad(plain)) < 2e-2


def test_model_with_kernels_gives_the_plain_loss_and_gradients(monkeypatch):
    """The whole training loss with every kernel switched on, through GPT(kernels=...), against GPT without."""
    if INTERPRET:
        monkeypatch.setenv("NANOCHAT_JAX_PALLAS_INTERPRET", "1")
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    x, y = (jax.random.randint(jax.random.key(i), (2, 64), 0, 512) for i in (3, 4))
    y = y.at[:, :10].set(-1)  # ignored targets, as SFT's prompts
    advantages = jax.random.normal(jax.random.key(6), (2, 64))  # RL's per-token weights

    def loss_and_grads(names, weights):
        model = GPT(config, dtype=jnp.bfloat16, kernels=names, rngs=nnx.Rngs(0))
        for block in model.blocks:  # nanochat zeroes both output projections: give the blocks something to do
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.kernel[...] = 0.02 * jax.random.normal(jax.random.key(5), proj.kernel.shape)
        loss, grads = nnx.value_and_grad(lambda m: m(x, y, weights=weights))(model)
        return float(loss), jax.tree.leaves(nnx.state(grads))

    for weights in (None, advantages):  # the mean loss, and RL's weighted sum
        (loss, grads), (want_loss, want_grads) = loss_and_grads(kernels.NAMES, weights), loss_and_grads((), weights)
        assert abs(loss - want_loss) < 1e-3 * abs(want_loss)
        assert len(grads) == len(want_grads)
        for g, w in zip(grads, want_grads):
            assert rel_err(g, w) < 3e-2


def test_every_kernel_lowers_to_triton_for_cuda():
    """Pallas's Triton lowering runs without a GPU (what it checks: power-of-2 arrays, supported primitives), so
    the kernels the GPU will compile, forward and backward at d20's head and tile shapes, are checked here too;
    what it leaves to the GPU is Triton's own compile."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    S = jax.ShapeDtypeStruct
    q, cs = S((256, 10, 128), jnp.bfloat16), S((256, 64), jnp.bfloat16)
    for rows in (None, 16):
        rope_grad = jax.grad(lambda q, c, s: kernels.rope_qk_norm(q, c, s, False, rows).astype(jnp.float32).sum())
        assert triton_calls(rope_grad, q, cs, cs) == 2  # forward and backward
    assert triton_calls(kernels.xent_chunk, S((64, 65536), jnp.bfloat16), S((64,), jnp.int32), S((64,), jnp.float32)) == 1
    x, w, r = S((1024, 1280), jnp.bfloat16), S((1280, 5120), jnp.bfloat16), S((1024,), jnp.float32)
    assert triton_calls(jax.grad(lambda x, w, r: kernels.mlp_up(x, w, r).astype(jnp.float32).sum()), x, w, r) == 1

    def not_a_power_of_2(x_ref, o_ref):
        o_ref[...] = 2 * x_ref[...]
    bad = pl.pallas_call(not_a_power_of_2, out_shape=S((10,), jnp.float32), compiler_params=plgpu.CompilerParams())
    with pytest.raises(ValueError, match="power of 2"):
        triton_calls(bad, S((10,), jnp.float32))


def random_caches(key, L, B, S, K, Dh, dtype):
    k = jax.random.split(key, 2)
    return tuple(jax.random.normal(k[i], (L, B, S, K, Dh)).astype(dtype) for i in range(2))


def decode_inputs(pos, H, K, Dh, dtype, L=3, R=None, S=64, seed=7):
    """A fused QKV product per row, the rotary tables of its position, and caches of R >= len(pos) rows."""
    from nanochat_jax.model import rotary_tables
    keys = jax.random.split(jax.random.key(seed), 2)
    qkv = jax.random.normal(keys[0], (len(pos), (H + 2 * K) * Dh)).astype(dtype)
    cos, sin = (t[:, 0] for t in rotary_tables(pos[:, None], Dh))
    return (qkv, cos, sin, *random_caches(keys[1], L, R or len(pos), S, K, Dh, dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("H, K", [(4, 2), (3, 3), (6, 2)])  # GQA, one query head per kv head (d20), groups of 3
@pytest.mark.parametrize("dots", [True, False])
def test_decode_attention_matches_the_model_cache_path(monkeypatch, dtype, H, K, dots):
    """Rows at different positions of layer 1 of the caches, through a window of 32 with blocks of 16: the first
    position, the end of a block and the start of the next, the window's last position, and a row past the window
    (which reads the whole window, as the reference's mask has it). The caches have a row more than the batch
    (the scheduler's free slot), which stays as it was; the new keys and values land at pos in layer 1 only.
    Scores and output by tensor-core dots (dots) or by sums on the CUDA cores."""
    monkeypatch.setattr(kernels, "DECODE_DOTS", dots)
    Dh, window, layer = 32, 32, 1
    pos = jnp.array([0, 15, 16, 31, 40])
    args = decode_inputs(pos, H, K, Dh, dtype, R=len(pos) + 1)
    y, k_cache, v_cache = kernels.decode_attention(*args, layer, pos, window, interpret=INTERPRET, block=16)
    with jax.default_matmul_precision("float32"):  # no TF32 in the reference on a GPU
        want_y, want_k, want_v = kernels.decode_attention_reference(*args, layer, pos, window)
    assert y.dtype == dtype and y.shape == (len(pos), H, Dh)
    assert rel_err(y, want_y) < (1e-5 if dtype == jnp.float32 else 1e-2)  # bf16: the reference rounds its probabilities
    written = np.zeros(k_cache.shape[:3], bool)
    written[layer, np.arange(len(pos)), pos] = True
    for got, want, before in ((k_cache, want_k, args[3]), (v_cache, want_v, args[4])):
        np.testing.assert_array_equal(np.asarray(got)[~written], np.asarray(before)[~written])
        assert rel_err(np.asarray(got)[written], np.asarray(want)[written]) < (1e-5 if dtype == jnp.float32 else 1e-2)


def test_decode_attention_reads_only_its_layer_up_to_pos():
    """Garbage in the positions from each row's pos on (the new key comes from the product, not the cache) and in
    the other layers changes nothing."""
    H, K, Dh, window, layer = 4, 2, 32, 64, 2
    pos = jnp.array([0, 20, 47])
    qkv, cos, sin, k_cache, v_cache = decode_inputs(pos, H, K, Dh, jnp.float32, seed=9)
    L, B, S = k_cache.shape[:3]
    filled = (jnp.arange(L)[:, None, None] == layer) & (jnp.arange(S)[None, None, :] < pos[None, :, None])  # (L, B, S)
    garbage = lambda c: jnp.where(filled[..., None, None], c, 1e4)
    attend = lambda k, v: kernels.decode_attention(qkv, cos, sin, k, v, layer, pos, window, interpret=INTERPRET, block=16)[0]
    np.testing.assert_array_equal(attend(garbage(k_cache), garbage(v_cache)), attend(k_cache, v_cache))


@pytest.mark.parametrize("programs", [1, 3, 8])
def test_decode_attention_prefetch_programs_change_nothing(monkeypatch, programs):
    """Weights given to prefetch add programs to the grid, which read them (into L2, on a GPU) while the others
    attend: the outputs and the cache writes are bit for bit those without, for a few programs or more than the
    weights have tiles, and a weight that is not a whole number of tiles (its tail is masked)."""
    H, K, Dh, window, layer = 4, 2, 32, 64, 1
    pos = jnp.array([3, 40])
    args = decode_inputs(pos, H, K, Dh, jnp.bfloat16, seed=11)
    weights = [jax.random.normal(jax.random.key(i), shape).astype(jnp.bfloat16) for i, shape in enumerate(((64, 32), (50, 32)))]
    attend = lambda prefetch: kernels.decode_attention(*args, layer, pos, window, interpret=INTERPRET, block=16, prefetch=prefetch)
    want = attend(())
    monkeypatch.setattr(kernels, "PREFETCH_TILE", 256)  # 8 and 6.25 tiles
    monkeypatch.setattr(kernels, "DECODE_PREFETCH", programs)
    for got, ref in zip(attend(weights), want):
        np.testing.assert_array_equal(got, ref)


def test_decode_kernels_lower_to_one_triton_call_each_on_the_whole_caches():
    """At d20's shapes (20 layers, 10 heads of 128, a 2048-token cache, window 256; its four products), batch 1, 8
    and 32, and with groups of 5 query heads: one Triton call per kernel, no slice of the caches before the
    attention (XLA would copy it), and the caches aliased to its outputs (written in place)."""
    S = jax.ShapeDtypeStruct
    for B, H, K in ((1, 10, 10), (32, 10, 10), (4, 10, 2)):
        qkv, cs = S((B, (H + 2 * K) * 128), jnp.bfloat16), S((B, 64), jnp.bfloat16)
        cache, pos = S((20, B, 2048, K, 128), jnp.bfloat16), S((B,), jnp.int32)
        attend = lambda qkv, c, s, k, v, pos: kernels.decode_attention(qkv, c, s, k, v, 7, pos, 256)
        text = lower_for_cuda(attend, qkv, cs, cs, cache, cache, pos)
        assert text.count("xla.gpu.triton") == 1 and "slice" not in text and "output_operand_alias" in text
    weights = S((1280, 1280), jnp.bfloat16), S((5120, 1280), jnp.bfloat16)  # batch 1's prefetch: the weights, not copies
    attend = lambda qkv, c, s, k, v, pos, *w: kernels.decode_attention(qkv, c, s, k, v, 7, pos, 256, prefetch=w)
    qkv, cs, cache, pos = S((1, 30 * 128), jnp.bfloat16), S((1, 64), jnp.bfloat16), S((20, 1, 2048, 10, 128), jnp.bfloat16), S((1,), jnp.int32)
    text = lower_for_cuda(attend, qkv, cs, cs, cache, cache, pos, *weights)
    assert text.count("xla.gpu.triton") == 1 and "slice" not in text and "copy" not in text
    for B in (1, 8):
        for N, K in ((3840, 1280), (1280, 1280), (5120, 1280), (1280, 5120)):
            x, w, res = S((B, K), jnp.bfloat16), S((N, K), jnp.bfloat16), S((B, N), jnp.bfloat16)
            assert triton_calls(lambda x, w: kernels.decode_linear(x, w, norm=True, relu2=True), x, w) == 1
            assert triton_calls(lambda x, w, r: kernels.decode_linear(x, w, residual=r), x, w, res) == 1


def test_decode_attention_supported_is_what_triton_lowers():
    """Heads and blocks of keys must be powers of 2 and the blocks must tile the window; where they are not, the
    Triton lowering fails, so the model keeps its plain path."""
    S = jax.ShapeDtypeStruct

    def lowers(Dh, window, block):
        qkv, cs = S((2, 8 * Dh), jnp.bfloat16), S((2, Dh // 2), jnp.bfloat16)
        cache, pos = S((2, 2, 512, 2, Dh), jnp.bfloat16), S((2,), jnp.int32)
        attend = lambda qkv, c, s, k, v, pos: kernels.decode_attention(qkv, c, s, k, v, 1, pos, window, block=block)
        try:
            return triton_calls(attend, qkv, cs, cs, cache, cache, pos) == 1
        except ValueError as e:
            assert "power of 2" in str(e)
            return False
    # (Dh, window, block): d20's, a window smaller than the block, a head of 96, a block of 48, a window of 24
    for case in ((128, 256, 64), (64, 16, 64), (96, 256, 64), (128, 256, 48), (128, 24, 64)):
        assert kernels.decode_attention_supported(*case) == lowers(*case), case


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("epilogue", [{}, dict(norm=True), dict(norm=True, relu2=True), dict(residual=True)])
def test_decode_linear_matches_the_cache_path_products(dtype, epilogue):
    """Three rows through a (96, 256) weight in tiles of (2, 64) (kernels.gemv_tiles with a small tile): the plain
    product, with the RMSNorm before it, with ReLU² after it, and added to a residual, as the model rounds them;
    the same numbers with the weight tiles loaded first (GEMV_WEIGHTS_FIRST)."""
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (3, 256)).astype(dtype)
    w = (0.1 * jax.random.normal(keys[1], (96, 256))).astype(dtype)
    if epilogue.get("residual"):
        epilogue = dict(residual=jax.random.normal(keys[2], (3, 96)).astype(dtype))
    settings = kernels.GEMV_TILE, kernels.GEMV_PROGRAMS, kernels.GEMV_WEIGHTS_FIRST
    try:
        kernels.GEMV_TILE, kernels.GEMV_PROGRAMS = 128, 32
        assert kernels.gemv_tiles(96, 256) == (2, 64)
        got = kernels.decode_linear(x, w, interpret=INTERPRET, **epilogue)
        kernels.GEMV_WEIGHTS_FIRST = not kernels.GEMV_WEIGHTS_FIRST
        np.testing.assert_array_equal(kernels.decode_linear(x, w, interpret=INTERPRET, **epilogue), got)
    finally:
        kernels.GEMV_TILE, kernels.GEMV_PROGRAMS, kernels.GEMV_WEIGHTS_FIRST = settings
    with jax.default_matmul_precision("float32"):
        want = kernels.decode_linear_reference(x, w, **epilogue)
    assert got.dtype == dtype and got.shape == (3, 96)
    assert rel_err(got, want) < (1e-5 if dtype == jnp.float32 else 1e-2)  # bf16: one rounding apart at most


def test_gemv_tiles_cover_the_product_with_enough_programs():
    """d20's four products: tiles that divide them, at least GEMV_PROGRAMS programs where the rows allow, no tile
    over GEMV_TILE elements; none where K has no power-of-2 chunk of 16."""
    for N, K in ((3840, 1280), (1280, 1280), (5120, 1280), (1280, 5120)):
        bn, bk = kernels.gemv_tiles(N, K)
        assert N % bn == 0 and K % bk == 0 and bn * bk <= kernels.GEMV_TILE and N // bn >= kernels.GEMV_PROGRAMS
    assert kernels.gemv_tiles(3840, 1280) == (8, 256)
    assert kernels.gemv_tiles(64, 24) is None and not kernels.decode_linear_supported(64, 24)


def test_mode_is_none_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("NANOCHAT_JAX_PALLAS_INTERPRET", raising=False)
    assert kernels.mode() == ("triton" if jax.default_backend() == "gpu" else None)


def test_kernels_on_a_mesh_run_per_device_and_match_one_device(monkeypatch):
    """Under data x fsdp the kernels run inside shard_map on each device's own rows (a Pallas call has no
    partitioning rule); under data x fsdp x tensor they fall back to the plain path (heads, MLP and vocab are split).
    Two optimizer steps give the plain one-device losses either way, and Muon's update of c_fc the same weights.
    (AdamW's first steps are about ±lr whatever the gradient's size, so bf16 noise in tiny gradients flips them:
    its weights are not compared.)"""
    from nanochat_jax.optim import build_optimizer
    from nanochat_jax.sharding import global_batch, make_mesh
    from nanochat_jax.train import init_train_state, make_train_step
    if INTERPRET:
        monkeypatch.setenv("NANOCHAT_JAX_PALLAS_INTERPRET", "1")
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
    batch = np.random.default_rng(0).integers(0, config.vocab_size, (2, 1, 8, config.sequence_len + 1), dtype=np.int32)
    out = []
    for names, spec, devices in (((), "data=1", jax.devices()[:1]), (kernels.NAMES, "data=2,fsdp=2,tensor=2", jax.devices()),
                                 (kernels.NAMES, "data=2,fsdp=4", jax.devices())):
        mesh = make_mesh(spec, devices=devices)
        tx = build_optimizer(config.n_embd, num_iterations=10, ns_dtype=jnp.float32)
        graphdef, state = init_train_state(config, tx, mesh, seed=0, dtype=jnp.bfloat16, kernels=names)
        step = make_train_step(graphdef, state)
        losses = []
        for micro in batch:
            arrays = tuple(global_batch(a, mesh, batch_axis=1) for a in (micro[..., :-1], micro[..., 1:]))
            # the kernels run where the mesh splits rows only, and the plain path under a tensor axis
            assert ("pallas_call" in str(step.trace(state, *arrays).jaxpr)) == (bool(names) and "tensor" not in spec)
            state, metrics = step(state, *arrays)
            losses.append(float(metrics["loss"]))
        out.append((np.array(losses), np.asarray(nnx.merge(graphdef, state)[0].blocks[0].mlp.c_fc.kernel[...])))
    (losses_1, fc_1), *meshes = out
    for losses, fc in meshes:
        np.testing.assert_allclose(losses, losses_1, rtol=1e-3)
        assert np.linalg.norm(fc - fc_1) / np.linalg.norm(fc_1) < 1e-2
