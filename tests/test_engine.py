"""The KV-cache engine against the naive full-recompute loop, plus sampling behaviour and cache limits.
A tiny model with random weights (every weight non-zero) and a byte-level tokenizer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.engine import Engine, greedy_naive
from nanochat_jax.model import GPT, GPTConfig
from nanochat_jax.tokenizer import Tokenizer

BYTES = Tokenizer([bytes([b]) for b in range(256)])  # 265 tokens with the specials
CONFIG = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
PROMPT = [256, *b"Hello there"]  # <|bos|> then bytes


@pytest.fixture(scope="module")
def model():
    model = GPT(CONFIG, rngs=nnx.Rngs(0))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    for _, param in nnx.iter_graph(model):
        if isinstance(param, nnx.Param):
            param[...] = jax.random.normal(next(keys), param.shape) * 0.3
    return model


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
    """Cached logits at every position equal the full forward's, also when rows sit at different positions."""
    x = jnp.asarray([PROMPT + [65, 66, 67]], jnp.int32)  # (1, 15)
    full = model(x)
    c = CONFIG
    k = v = jnp.zeros((c.n_layer, 1, c.sequence_len, c.n_kv_head, c.head_dim))
    logits, k, v = model.decode(x[:, :12], k, v, jnp.array([0]))
    np.testing.assert_allclose(logits, full[:, :12], atol=1e-5)
    for t in range(12, 15):
        step_logits, k, v = model.decode(x[:, t:t + 1], k, v, jnp.array([t]))
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=1e-5)


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
