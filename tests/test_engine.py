"""The KV-cache engine against the naive full-recompute loop, the device loop against the host loop,
sampling behaviour, cache limits and the calculator tool. A tiny model with random weights (every weight
non-zero) and a byte-level tokenizer; for the tool, a tiny model trained to write one calculator call."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import randomize
from nanochat_jax.engine import Engine, greedy_naive
from nanochat_jax.model import GPT, GPTConfig
from nanochat_jax.tokenizer import Tokenizer

BYTES = Tokenizer([bytes([b]) for b in range(256)])  # 265 tokens with the specials
CONFIG = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
PROMPT = [256, *b"Hello there"]  # <|bos|> then bytes


@pytest.fixture(scope="module")
def model():
    return randomize(GPT(CONFIG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, BYTES)


def test_greedy_engine_equals_naive_recompute(model, engine):
    """Decoding over the cache gives exactly the tokens of re-running the whole sequence every step."""
    results, masks = engine.generate_batch(PROMPT, num_samples=2, max_tokens=30, temperature=0.0)
    naive = greedy_naive(jax.jit(lambda x: model(x)), [PROMPT], 30, stop_ids=engine.stop_ids)[0]
    assert results[0] == results[1] == naive
    assert masks[0] == [1] * len(naive)  # every token sampled, none forced


def test_prefill_then_decode_equals_one_forward(model):
    """Cached logits at every position equal the full forward's, whatever the attention window."""
    with jax.default_matmul_precision("float32"):  # on a GPU, XLA's fp32 products would otherwise round to TF32
        x = jnp.asarray([PROMPT + [65, 66, 67]], jnp.int32)  # (1, 15)
        full = model(x)
        decode = jax.jit(model.decode, static_argnames="window")
        c = CONFIG
        k = v = jnp.zeros((c.n_layer, 1, c.sequence_len, c.n_kv_head, c.head_dim))
        h, k, v = decode(x[:, :12], k, v, jnp.array([0]), window=16)
        np.testing.assert_allclose(model.logits(h), full[:, :12], atol=1e-5)
        for t, window in zip(range(12, 15), (16, 32, 64)):
            h, k, v = decode(x[:, t:t + 1], k, v, jnp.array([t]), window=window)
            np.testing.assert_allclose(model.logits(h[:, 0]), full[:, t], atol=1e-5)


def test_rows_at_different_positions_share_a_batch(model):
    """Two prompts of different lengths decoded together match each decoded alone."""
    c = CONFIG
    a, b = PROMPT, PROMPT[:5]
    zeros = lambda B: jnp.zeros((c.n_layer, B, c.sequence_len, c.n_kv_head, c.head_dim))
    k, v = zeros(2), zeros(2)
    padded = jnp.asarray([a, b + [0] * (len(a) - len(b))], jnp.int32)
    decode = jax.jit(model.decode)
    _, k, v = decode(padded, k, v, jnp.array([0, 0]))
    # next token of each row at its own position; b's padding in the cache is overwritten or masked
    h, _, _ = decode(jnp.asarray([[70], [71]], jnp.int32), k, v, jnp.array([len(a), len(b)]))
    alone = [model(jnp.asarray([seq + [t]], jnp.int32))[0, -1] for seq, t in ((a, 70), (b, 71))]
    np.testing.assert_allclose(model.logits(h[:, 0]), jnp.stack(alone), atol=1e-5)


def test_device_loop_equals_host_loop(engine):
    """generate_batch (lax.while_loop on the device) yields exactly the streamed tokens of generate()."""
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9, seed=3), dict(temperature=0.8, seed=5)):
        streamed = [[] for _ in range(4)]
        for column, _ in engine.generate(PROMPT, num_samples=4, max_tokens=20, **kwargs):
            for i, t in enumerate(column):
                if not streamed[i] or streamed[i][-1] not in engine.stop_ids:
                    streamed[i].append(t)
        streamed = [[t for t in s if t not in engine.stop_ids] for s in streamed]
        results, masks = engine.generate_batch(PROMPT, num_samples=4, max_tokens=20, **kwargs)
        assert results == streamed, kwargs
        assert all(m == [1] * len(r) for r, m in zip(results, masks))


KERNEL_PROMPTS = [PROMPT, PROMPT[:3], [256, *b"What is the capital of France?"]]
KERNEL_SAMPLING = [dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=3)]


def decode_for_kernels(engine):
    with jax.default_matmul_precision("float32"):  # on a GPU, XLA's fp32 products would otherwise round to TF32
        return [engine.generate_many(KERNEL_PROMPTS, num_samples=2, max_tokens=24, **kw)[0] for kw in KERNEL_SAMPLING]


@pytest.fixture(scope="module")
def xla_tokens(engine):
    return decode_for_kernels(engine)


@pytest.mark.parametrize("gemv_rows", [0, 8])
def test_decode_kernels_give_the_same_tokens(model, xla_tokens, monkeypatch, gemv_rows):
    """With kernels.decode_attention over the cache, and (gemv_rows 8) kernels.decode_linear for the products (here
    in Pallas's interpreter, on a GPU as Triton) the engine decodes the tokens of XLA's path, greedy and sampled,
    prompts of different lengths in one batch; the kernels are traced for the batch sizes they are set for."""
    from nanochat_jax import kernels
    monkeypatch.setenv("NANOCHAT_JAX_PALLAS_INTERPRET", "1")
    monkeypatch.setattr(kernels, "DECODE_GEMV_ROWS", gemv_rows)
    monkeypatch.setattr(kernels, "DECODE_ATTENTION_ROWS", 1)
    with_kernel = Engine(model, BYTES)  # a fresh engine: its jitted steps trace the kernels
    step = lambda rows: str(jax.make_jaxpr(lambda s, k, v: with_kernel.decode(s, jnp.zeros((rows, 1), jnp.int32), k, v, jnp.arange(rows) + 3, 16))(
        with_kernel.state, *with_kernel.new_cache(rows)))
    assert step(2).count("name=decode_attention") == CONFIG.n_layer
    assert step(2).count("name=decode_linear") == (4 * CONFIG.n_layer if gemv_rows else 0)
    assert step(16).count("name=decode_linear") == 0  # more rows than DECODE_GEMV_ROWS: XLA's products
    monkeypatch.setattr(kernels, "DECODE_ATTENTION_ROWS", 4)  # used from this many rows up: XLA's attention below
    assert ("decode_attention" in step(2)) == bool(gemv_rows) and "decode_attention" in step(4)
    monkeypatch.setattr(kernels, "DECODE_ATTENTION_ROWS", 1)
    assert decode_for_kernels(with_kernel) == xla_tokens


def test_seeded_sampling_is_reproducible_and_samples_differ(engine):
    """Same seed, same samples; and each of 8 samples draws its own first token (nanochat once gave all
    samples the same first token: the prefill logits must be sampled per row)."""
    a, _ = engine.generate_batch(PROMPT, num_samples=8, max_tokens=8, temperature=1.5, seed=7)
    b, _ = engine.generate_batch(PROMPT, num_samples=8, max_tokens=8, temperature=1.5, seed=7)
    c, _ = engine.generate_batch(PROMPT, num_samples=8, max_tokens=8, temperature=1.5, seed=8)
    assert a == b and a != c
    assert len({s[0] for s in a}) > 1


def test_top_k_one_is_greedy_and_max_tokens_is_honoured(engine):
    greedy, _ = engine.generate_batch(PROMPT, num_samples=1, max_tokens=12, temperature=0.0)
    top1, _ = engine.generate_batch(PROMPT, num_samples=3, max_tokens=12, temperature=1.0, top_k=1)
    assert all(s == greedy[0] for s in top1) and len(greedy[0]) <= 12


def test_full_cache_stops_instead_of_overwriting(engine):
    """With 60 of 64 positions used by the prompt, generation stops when the cache is full (nanochat #187)."""
    prompt = [256] + [97] * 59
    steps = list(engine.generate(prompt, num_samples=1, max_tokens=100, temperature=0.0))
    assert len(steps) == 64 - 60 + 1  # positions 60..63 fill the cache; the last token is never fed back
    with pytest.raises(ValueError, match="does not fit the KV cache of 64 positions"):
        next(engine.generate([256] * 64, max_tokens=5))


def test_many_prompts_decode_together_as_each_alone(engine):
    """generate_many: prompts of different lengths, several samples each, in batches of rows, give each
    prompt exactly what generate_batch gives it alone (rows are keyed per prompt and sample, not per batch
    slot). The longest prompt fills its cache before max_tokens and stops there on its own."""
    prompts = [PROMPT, PROMPT[:3], [256] + [97] * 55, PROMPT[:7] + [101, 102]]
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=7)):
        alone = [engine.generate_batch(p, num_samples=2, max_tokens=20, **kwargs) for p in prompts]
        for batch_size in (None, 4):  # all 8 rows at once; 2 prompts per batch (the last batch padded)
            results, masks = engine.generate_many(prompts, num_samples=2, max_tokens=20, batch_size=batch_size, **kwargs)
            assert results == [r for r, _ in alone] and masks == [m for _, m in alone], (kwargs, batch_size)
    assert all(len(r) <= 64 - 56 + 1 for r in alone[2][0])  # positions 56..63, then one token never fed


def test_prompt_len_shapes_batches_of_other_prompts_alike(model):
    """RL's rollouts: shaped for the task's longest prompt, steps whose prompts fall in different length buckets
    (16 and 32 here) share one compiled prefill, and each prompt still gets exactly its own tokens."""
    engine = Engine(model, BYTES)  # its own compiled functions, to count them
    knobs = dict(num_samples=2, max_tokens=8, temperature=1.0, top_k=20, seed=3)
    steps = [[PROMPT[:3], PROMPT[:5]], [PROMPT, [256] + [97] * 20]]
    shaped = [engine.generate_many(prompts, prompt_len=21, **knobs)[0] for prompts in steps]
    assert engine._prefill._cache_size() == 1
    assert shaped == [[engine.generate_batch(p, **knobs)[0] for p in prompts] for prompts in steps]


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    """Nucleus and top-k on a known distribution: only allowed tokens ever come out."""
    from nanochat_jax.engine import row_keys, sample_next
    probs = jnp.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.tile(jnp.log(probs), (2000, 1))
    rows = jnp.arange(2000)
    keys = row_keys(jnp.zeros(2000, jnp.int32), rows, jnp.zeros(2000, jnp.int32))
    knobs = lambda t, k, p: (jnp.full(2000, t), jnp.full(2000, k, jnp.int32), jnp.full(2000, p))
    for top_k, top_p, allowed in ((0, 0.7, {0, 1}), (0, 0.85, {0, 1, 2}), (2, 1.0, {0, 1}), (0, 1.0, {0, 1, 2, 3})):
        tokens = set(np.asarray(sample_next(logits, keys, *knobs(1.0, top_k, top_p))).tolist())
        assert tokens == allowed, (top_k, top_p)
    # a larger k than the fast path handles still samples from the full sorted list
    wide = jnp.tile(jnp.log(jnp.full(512, 1 / 512)), (64, 1))
    tokens = sample_next(wide, keys[:64], jnp.ones(64), jnp.full(64, 300, jnp.int32), jnp.ones(64))
    assert int(tokens.max()) < 512 and len(set(np.asarray(tokens).tolist())) > 32


def test_top_candidates_equal_lax_top_k():
    """The chunked top-k (only the chunks with the largest maxima are ranked) gives lax.top_k's answer at
    the real vocabulary size; with many equal logits, the same values and valid distinct ids."""
    from nanochat_jax.engine import top_candidates
    x = jax.random.normal(jax.random.key(0), (4, 65536))
    for n in (256, 50):
        values, ids = jax.jit(top_candidates, static_argnums=1)(x, n)
        expected = jax.lax.top_k(x, n)
        assert (values == expected[0]).all() and (ids == expected[1]).all()
    ties = jnp.round(x * 4) / 4
    values, ids = jax.jit(top_candidates, static_argnums=1)(ties, 256)
    assert (values == jax.lax.top_k(ties, 256)[0]).all()
    assert (jnp.take_along_axis(ties, ids, axis=1) == values).all() and all(len(set(r)) == 256 for r in np.asarray(ids).tolist())


def test_fewer_candidates_draw_the_same_tokens(monkeypatch):
    """A top-k of at most TOP_K_FAST draws from the TOP_K_FAST largest logits; how many there are, and the chunking
    that finds them, change no token: ranks past k are masked, and a row's Gumbel noise for rank i is the same
    whatever the candidates' count (threefry's bits are per element)."""
    from nanochat_jax import engine
    from nanochat_jax.engine import row_keys, sample_next
    B = 8
    logits = jax.random.normal(jax.random.key(4), (B, 65536)) * 2
    keys = row_keys(jnp.full(B, 9, jnp.int32), jnp.arange(B), jnp.zeros(B, jnp.int32))
    knobs = (jnp.full(B, 0.9), jnp.array([1, 5, 20, 50, 64, 50, 64, 30], jnp.int32), jnp.array([1.0] * 5 + [0.9, 0.5, 0.95]))
    draws = []
    for fast, chunk in ((256, 16), (64, 32), (64, 16)):
        monkeypatch.setattr(engine, "TOP_K_FAST", fast)
        monkeypatch.setattr(engine, "TOP_K_CHUNK", chunk)
        draws.append(np.asarray(jax.jit(sample_next, static_argnames="mode")(logits, keys, *knobs, mode=2)))
    for mode in (4, 5):  # the same rows in a batch that needs all V sorted, or TOP_K_WIDE candidates
        draws.append(np.asarray(jax.jit(sample_next, static_argnames="mode")(logits, keys, *knobs, mode=mode)))
    assert all((d == draws[0]).all() for d in draws) and len(set(draws[0].tolist())) > 1


def test_static_sampling_mode_equals_the_device_switch():
    """sample_next with the mode chosen on the host (compiled in) draws exactly what the lax.switch draws."""
    from nanochat_jax.engine import row_keys, sample_next, sampling_mode
    B = 6
    logits = jax.random.normal(jax.random.key(2), (B, 1000)) * 3
    keys = row_keys(jnp.full(B, 3, jnp.int32), jnp.arange(B), jnp.zeros(B, jnp.int32))
    cases = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 40, 1.0), (1.0, 40, 0.9), (1.0, 0, 0.9), (1.0, 300, 1.0), (1.0, 100, 1.0)]
    modes = set()
    for case in cases + [[0, 0, 40, 5, 0, 300], [0, 0, 100, 5, 0, 0]]:
        if isinstance(case, list):  # a mixed batch: greedy, plain and top-k rows together
            knobs = (np.array([0.0, 1.0, 1.0, 0.5, 1.0, 0.0], np.float32), np.array(case, np.int32), np.ones(B, np.float32))
        else:
            t, k, p = case
            knobs = (np.full(B, t, np.float32), np.full(B, k, np.int32), np.full(B, p, np.float32))
        mode = sampling_mode(*knobs)
        modes.add(mode)
        dynamic = jax.jit(sample_next)(logits, keys, *knobs)
        static = jax.jit(sample_next, static_argnames="mode")(logits, keys, *knobs, mode=mode)
        assert (dynamic == static).all(), (case, mode)
    assert modes == {0, 1, 2, 3, 4, 5, 6}


# -----------------------------------------------------------------------------
# The calculator tool, with a model that has learned to call it

S = {name: BYTES.encode_special(name) for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                                  "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                                                  "<|output_start|>", "<|output_end|>")}
TOOL_PROMPT = [S["<|bos|>"], S["<|user_start|>"], *b"6 x 7?", S["<|user_end|>"], S["<|assistant_start|>"]]
# the trained reply writes the wrong tool output, 99: the engine must force the calculator's 42 instead
TOOL_REPLY = [*b"ok ", S["<|python_start|>"], *b"6*7", S["<|python_end|>"], S["<|output_start|>"], *b"99",
              S["<|output_end|>"], *b" done", S["<|assistant_end|>"]]


@pytest.fixture(scope="module")
def tool_model():
    model = GPT(CONFIG, rngs=nnx.Rngs(0))
    seq = jnp.asarray([TOOL_PROMPT + TOOL_REPLY], jnp.int32)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(seq[:, :-1], seq[:, 1:]))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(300):
        loss = train_step(model, optimizer)
    assert float(loss) < 0.01  # it has memorised the reply
    return model


@pytest.fixture(scope="module")
def tool_engine(tool_model):
    return Engine(tool_model, BYTES)


def test_calculator_result_is_forced_into_the_stream(tool_engine):
    expected = [*b"ok ", S["<|python_start|>"], *b"6*7", S["<|python_end|>"], S["<|output_start|>"], *b"42", S["<|output_end|>"]]
    streamed = [column[0] for column, _ in tool_engine.generate(TOOL_PROMPT, max_tokens=len(expected), temperature=0.0)]
    assert streamed == expected
    results, masks = tool_engine.generate_batch(TOOL_PROMPT, num_samples=2, max_tokens=len(TOOL_REPLY) + 4, temperature=0.0)
    assert results[0] == results[1] and results[0][:len(expected)] == expected
    forced = [i for i, m in enumerate(masks[0]) if m == 0]
    assert forced == list(range(len(expected) - 4, len(expected)))  # <|output_start|> 4 2 <|output_end|>, none sampled
    host, _ = zip(*tool_engine.generate(TOOL_PROMPT, max_tokens=len(TOOL_REPLY) + 4, temperature=0.0))
    assert [c[0] for c in host][:len(results[0])] == results[0]  # device loop and host loop agree after the call
    # beside prompts that never call it, each row gets its own calculator answer
    many, many_masks = tool_engine.generate_many([PROMPT, TOOL_PROMPT, PROMPT[:4], TOOL_PROMPT], max_tokens=len(TOOL_REPLY) + 4, temperature=0.0)
    assert many[1] == many[3] == [results[0]] and many_masks[1] == [masks[0]]


def test_a_failed_calculation_forces_nothing(tool_engine):
    """An expression the calculator refuses (here a cut-off one) leaves the stream to the model."""
    prompt = TOOL_PROMPT + [*b"ok ", S["<|python_start|>"], *b"6*"]
    results, masks = tool_engine.generate_batch(prompt, max_tokens=3, temperature=0.0)
    assert all(m == 1 for m in masks[0])


@pytest.mark.parametrize("check_every", [1, 3])
def test_steps_between_condition_reads_change_no_token(tool_model, tool_engine, monkeypatch, check_every):
    """The device loop runs Engine.CHECK_EVERY steps between reads of its condition; steps past the point where it
    should have stopped (a stop token, a calculator call, a row reaching the window or the cache's end, the step
    limit) change nothing, so every setting gives the default's (8) tokens and masks, on both loops. Two prompts a
    batch: the first batch starts with a window of 16 positions and widens it twice."""
    prompts = [PROMPT, TOOL_PROMPT, [256] + [97] * 55, PROMPT[:4]]
    run = lambda e, **kw: (e.generate_many(prompts, num_samples=2, max_tokens=len(TOOL_REPLY) + 4, batch_size=4, **kw),
                           list(e.generate(TOOL_PROMPT, num_samples=2, max_tokens=len(TOOL_REPLY) + 4, **kw)))
    monkeypatch.setattr(Engine, "CHECK_EVERY", check_every)
    engine = Engine(tool_model, BYTES)  # a fresh engine: its device loop is traced with this setting
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=5)):
        assert run(engine, **kwargs) == run(tool_engine, **kwargs), kwargs
