"""The GPT: nanochat v1's shapes, init and maths, checked on tiny configs (D=64) on the CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.model import GPT, GPTConfig, config_for_depth, cross_entropy, cross_entropy_sum, softcap

TINY = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


# Jitted calls: eager op-by-op dispatch would make these tests ~5x slower.
logits_of = nnx.jit(lambda model, x: model(x))
loss_of = nnx.jit(lambda model, x, y: model(x, y))
per_token_loss_of = nnx.jit(lambda model, x, y: model(x, y, loss_reduction="none"))
loss_and_grads_of = nnx.jit(lambda model, x, y: nnx.value_and_grad(lambda m: m(x, y))(model))


def tokens(shape, seed=0, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def trained_like(model, seed=1):
    """Init zeroes the output projections; give every weight random values so all paths matter."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, param in nnx.iter_graph(model):
        if isinstance(param, nnx.Param):
            param[...] = jax.random.normal(next(keys), param.shape) * 0.1
    return model


@pytest.mark.parametrize("depth, width, heads, params, flops", [
    (20, 1280, 10, 560_988_160, 3.491758e9),  # the speedrun model, as in nanochat's logs and report
    (26, 1664, 13, 1_081_999_360, None),
    (32, 2048, 16, 1_879_048_192, 1.207960e10),
])
def test_depth_dial_matches_nanochat_v1(depth, width, heads, params, flops):
    config = config_for_depth(depth)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.head_dim) == (width, heads, heads, 128)
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))  # shapes only: no memory
    assert model.num_params() == params
    if flops:
        assert model.estimate_flops() == pytest.approx(flops, rel=1e-6)


def test_config_rejects_impossible_head_layouts():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        GPTConfig(n_embd=64, n_head=4, n_kv_head=3)


def test_init_follows_nanochat_v1():
    config = GPTConfig(sequence_len=32, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)
    model = GPT(config, rngs=nnx.Rngs(0))
    bound = np.sqrt(3 / 256)
    assert np.std(model.wte.embedding[...]) == pytest.approx(1.0, rel=0.02)
    assert np.std(model.lm_head.kernel[...]) == pytest.approx(0.001, rel=0.02)
    for block in model.blocks:
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
            w = np.asarray(linear.kernel[...])
            assert np.abs(w).max() <= bound and np.std(w) == pytest.approx(1 / 16, rel=0.05)  # std 1/sqrt(D)
        assert not np.any(block.attn.c_proj.kernel[...]) and not np.any(block.mlp.c_proj.kernel[...])


def test_fresh_model_predicts_nearly_uniform():
    """With lm_head ~ N(0, 0.001) the first loss is ln(V): a check nanochat's logs show at step 0."""
    model = GPT(TINY, rngs=nnx.Rngs(0))
    x = tokens((2, 16))
    assert float(loss_of(model, x, x)) == pytest.approx(np.log(TINY.vocab_size), abs=0.01)


def test_chunked_loss_matches_plain_cross_entropy():
    """The chunked loss (never more than `chunk` rows of logits) equals the textbook one, value and gradient,
    including a ragged last chunk and ignored targets."""
    h = jax.random.normal(jax.random.key(0), (37, 16))
    w = jax.random.normal(jax.random.key(1), (16, 50)) * 0.5
    targets = jax.random.randint(jax.random.key(2), (37,), 0, 50).at[::5].set(-1)

    def plain(h, w):
        logits = softcap(h @ w)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
        return jnp.where(targets >= 0, nll, 0.0)

    chunked = jax.jit(lambda h, w: cross_entropy(h, w, targets, chunk_tokens=8))
    np.testing.assert_allclose(chunked(h, w), plain(h, w), rtol=1e-6, atol=1e-6)
    assert float(chunked(h, w)[0]) == 0.0  # target -1
    g_chunked = jax.grad(lambda h, w: chunked(h, w).sum(), argnums=(0, 1))(h, w)
    g_plain = jax.grad(lambda h, w: plain(h, w).sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g_chunked, g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_loss_sum_matches_autodiff_in_value_and_gradient():
    """cross_entropy_sum takes its gradients inside the forward pass; under a scaled sum (as a mean loss
    gives) they equal autodiff of the plain chunked loss, in fp32 and with bf16 activations (where the
    fused path sums the chunks' lm_head gradients in fp32, autodiff in bf16)."""
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        h = jax.random.normal(jax.random.key(3), (45, 16)).astype(dtype)
        w = jax.random.normal(jax.random.key(4), (16, 70)) * 0.5
        targets = jax.random.randint(jax.random.key(5), (45,), 0, 70).at[::4].set(-1)
        fused = jax.jit(jax.value_and_grad(lambda h, w: 0.3 * cross_entropy_sum(h, w, targets, None, 8), argnums=(0, 1)))
        plain = jax.jit(jax.value_and_grad(lambda h, w: 0.3 * cross_entropy(h, w, targets, 8).sum(), argnums=(0, 1)))
        (loss_f, grads_f), (loss_p, grads_p) = fused(h, w), plain(h, w)
        np.testing.assert_allclose(loss_f, loss_p, rtol=1e-6)
        for a, b in zip(grads_f, grads_p):
            assert a.dtype == b.dtype
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol
        assert not np.any(np.asarray(grads_f[0], np.float32)[::4])  # ignored tokens get no gradient


def test_fused_loss_with_per_token_weights_matches_autodiff():
    """RL's loss: sum(weights x token losses), weights of either sign (advantages), through the fused backward."""
    h = jax.random.normal(jax.random.key(3), (45, 16))
    w = jax.random.normal(jax.random.key(4), (16, 70)) * 0.5
    targets = jax.random.randint(jax.random.key(5), (45,), 0, 70).at[::4].set(-1)
    weights = jax.random.normal(jax.random.key(6), (45,))
    fused = jax.jit(jax.value_and_grad(lambda h, w: cross_entropy_sum(h, w, targets, weights, 8), argnums=(0, 1)))
    plain = jax.jit(jax.value_and_grad(lambda h, w: (cross_entropy(h, w, targets, 8) * weights).sum(), argnums=(0, 1)))
    (loss_f, grads_f), (loss_p, grads_p) = fused(h, w), plain(h, w)
    np.testing.assert_allclose(loss_f, loss_p, rtol=1e-5)
    for a, b in zip(grads_f, grads_p):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mean_loss_ignores_masked_targets():
    model = trained_like(GPT(TINY, rngs=nnx.Rngs(0)))
    x, y = tokens((2, 16)), tokens((2, 16), seed=1)
    y_masked = y.at[:, :5].set(-1)
    per_token = per_token_loss_of(model, x, y_masked)
    assert per_token.shape == (2, 16) and not np.any(per_token[:, :5])
    assert float(loss_of(model, x, y_masked)) == pytest.approx(float(per_token.sum() / 22), rel=1e-6)


def test_logits_do_not_depend_on_future_tokens():
    """Causality: changing tokens after position t leaves the logits up to t unchanged."""
    model = trained_like(GPT(TINY, rngs=nnx.Rngs(0)))
    x = tokens((1, 16))
    y = x.at[0, 9:].set((x[0, 9:] + 1) % TINY.vocab_size)
    a, b = logits_of(model, x), logits_of(model, y)
    np.testing.assert_array_equal(a[0, :9], b[0, :9])
    assert not np.allclose(a[0, 9:], b[0, 9:])


def test_gqa_equals_attention_with_repeated_kv_heads():
    """GQA shares each kv head with n_head / n_kv_head query heads: the same model with its k, v heads
    copied out to one per query head must give identical logits."""
    gqa = trained_like(GPT(TINY, rngs=nnx.Rngs(0)))
    mha_config = GPTConfig(**{**TINY.__dict__, "n_kv_head": TINY.n_head})
    mha = GPT(mha_config, rngs=nnx.Rngs(0))
    Dh, group = TINY.head_dim, TINY.n_head // TINY.n_kv_head
    mha.wte.embedding[...] = gqa.wte.embedding[...]
    mha.lm_head.kernel[...] = gqa.lm_head.kernel[...]
    for g, m in zip(gqa.blocks, mha.blocks):
        for name in ("c_q", "c_proj"):
            getattr(m.attn, name).kernel[...] = getattr(g.attn, name).kernel[...]
        for name in ("c_k", "c_v"):
            w = getattr(g.attn, name).kernel[...].reshape(TINY.n_embd, TINY.n_kv_head, Dh)
            getattr(m.attn, name).kernel[...] = jnp.repeat(w, group, axis=1).reshape(TINY.n_embd, -1)
        m.mlp.c_fc.kernel[...], m.mlp.c_proj.kernel[...] = g.mlp.c_fc.kernel[...], g.mlp.c_proj.kernel[...]
    x = tokens((2, 16))
    np.testing.assert_allclose(logits_of(gqa, x), logits_of(mha, x), rtol=1e-5, atol=1e-5)


def test_remat_changes_memory_not_maths():
    x, y = tokens((2, 16)), tokens((2, 16), seed=1)
    plain = trained_like(GPT(TINY, rngs=nnx.Rngs(0)))
    remat = trained_like(GPT(TINY, remat=True, rngs=nnx.Rngs(0)))
    (l1, g1), (l2, g2) = loss_and_grads_of(plain, x, y), loss_and_grads_of(remat, x, y)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_stays_close_to_fp32():
    """bf16 activations (the GPU setting) with fp32 params and fp32 logits: the loss moves by bf16 noise only."""
    x, y = tokens((2, 32)), tokens((2, 32), seed=1)
    fp32 = trained_like(GPT(TINY, rngs=nnx.Rngs(0)))
    bf16 = trained_like(GPT(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert logits_of(bf16, x).dtype == jnp.float32
    assert float(loss_of(bf16, x, y)) == pytest.approx(float(loss_of(fp32, x, y)), rel=2e-2)


def test_fp8_matmul_is_a_scaled_float8_gemm_with_straight_through_gradients():
    """e4m3 keeps 3 mantissa bits (a relative rounding of at most 1/16 per operand), e5m2 2 bits: the product
    and both gradients land within a few percent of the exact ones, and their dtypes are x's and w's."""
    from nanochat_jax.model import fp8_matmul
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(64, 32)) * 0.05, jnp.float32)
    g = jnp.asarray(rng.normal(size=(4, 16, 32)), jnp.float32)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert rel(fp8_matmul(x, w), x @ w) < 0.06  # measured 0.038
    _, pull = jax.vjp(fp8_matmul, x, w)
    _, exact = jax.vjp(lambda x, w: x @ w, x, w)
    (dx, dw), (dx_ref, dw_ref) = pull(g), exact(g)
    assert rel(dx, dx_ref) < 0.1 and rel(dw, dw_ref) < 0.1
    y = fp8_matmul(x.astype(jnp.bfloat16), w)
    assert y.dtype == jnp.bfloat16 and jax.vjp(fp8_matmul, x.astype(jnp.bfloat16), w)[1](y)[1].dtype == jnp.float32
    assert float(jnp.abs(fp8_matmul(jnp.zeros_like(x), w)).max()) == 0.0  # an all-zero operand: scale 1, not NaN


def test_fp8_blocks_train_like_full_precision():
    """--fp8 on the blocks' matmuls: the same model learns a batch about as fast as in fp32, and only the blocks
    change (the embedding and lm_head stay full precision)."""
    import optax
    x, y = tokens((4, 32)), tokens((4, 32), seed=1)
    final = {}
    for fp8 in (False, True):
        model = trained_like(GPT(TINY, fp8=fp8, rngs=nnx.Rngs(0)))
        optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer):
            loss, grads = nnx.value_and_grad(lambda m: m(x, y))(model)
            optimizer.update(model, grads)
            return loss
        losses = [float(step(model, optimizer)) for _ in range(30)]
        final[fp8] = losses
    assert final[True][0] == pytest.approx(final[False][0], rel=0.02)
    assert final[True][-1] < 0.5 * final[True][0]  # it learns
    assert final[True][-1] == pytest.approx(final[False][-1], rel=0.15)
    model = GPT(TINY, fp8=True, rngs=nnx.Rngs(0))
    assert model.blocks[0].mlp.c_fc.fp8 and model.blocks[1].attn.c_q.fp8 and not model.lm_head.fp8
