"""Continuous batching: a request gives the same tokens whether it runs alone through the engine or
shares the scheduler's batch with others; rows are freed on completion and on cancel; extra requests wait."""
import pytest
from flax import nnx

from conftest import randomize
from nanochat_jax.engine import Engine
from nanochat_jax.model import GPT, GPTConfig
from nanochat_jax.scheduler import Scheduler
from nanochat_jax.tokenizer import Tokenizer
from test_engine import TOOL_PROMPT, TOOL_REPLY, tool_engine, tool_model  # noqa: F401 (fixtures: the model that calls the calculator)

BYTES = Tokenizer([bytes([b]) for b in range(256)])
CONFIG = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
PROMPTS = [[256, *b"Hello there"], [256, *b"Hi"], [256, *b"What is the capital of France?"]]


@pytest.fixture(scope="module")
def engine():
    return Engine(randomize(GPT(CONFIG, rngs=nnx.Rngs(0))), BYTES)


def alone(engine, prompt, max_tokens, **knobs):
    tokens = [column[0] for column, _ in engine.generate(prompt, max_tokens=max_tokens, **knobs)]
    return [t for t in tokens if t not in engine.stop_ids]


def test_batched_requests_match_running_alone(engine):
    """Rows of different lengths, knobs and seeds decode together; each gets exactly its solo tokens."""
    scheduler = Scheduler(engine, slots=4)
    try:
        jobs = [(p, dict(temperature=t, top_k=k, seed=s)) for p, (t, k, s) in zip(PROMPTS * 2, [(0.0, 0, 0), (1.0, 50, 1), (0.7, 0, 2),
                                                                                           (1.2, 5, 3), (0.0, 0, 4), (1.0, 0, 5)])]
        requests = [scheduler.submit(p, max_tokens=20, **kw) for p, kw in jobs]  # 6 requests, 4 rows: two wait
        for request, (prompt, knobs) in zip(requests, jobs):
            assert list(request) == alone(engine, prompt, 20, **knobs), knobs
            assert request.finish_reason in ("stop", "length")
        stats = scheduler.snapshot()
        assert stats["completed"] == 6 and stats["busy_slots"] == 0
        assert max(map(int, stats["batch_sizes"])) > 1  # requests really shared decode steps
    finally:
        scheduler.close()


def test_a_plain_sampling_row_beside_a_nucleus_row_draws_as_it_does_alone(engine):
    """A top-p row makes the round sort all V logits; the plain row beside it (no top-k, no top-p) still takes the
    plain draw it takes alone, so it gets the same tokens."""
    scheduler = Scheduler(engine, slots=2)
    try:
        plain = scheduler.submit(PROMPTS[0], max_tokens=16, temperature=1.0, seed=7)
        nucleus = scheduler.submit(PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=8)
        assert list(plain) == alone(engine, PROMPTS[0], 16, temperature=1.0, seed=7)
        assert list(nucleus) == alone(engine, PROMPTS[1], 16, temperature=1.0, top_p=0.9, seed=8)
    finally:
        scheduler.close()


def test_a_burst_is_prefilled_in_batches_with_each_request_still_its_solo_tokens(engine):
    """Requests that queue up together (here, during the warm-up) are prefilled as the rows of one call, up to
    prefill_rows at a time, padded to a power of two; each still gets exactly the tokens it gets alone."""
    scheduler = Scheduler(engine, slots=8, warmup=True, prefill_rows=4)
    try:
        jobs = [(PROMPTS[i % 3], dict(temperature=t, top_k=k, seed=i)) for i, (t, k) in enumerate([(1.0, 50), (0.0, 0), (0.8, 5)] * 2)]
        requests = [scheduler.submit(p, max_tokens=12, **kw) for p, kw in jobs]  # queued while it compiles
        for request, (prompt, knobs) in zip(requests, jobs):
            assert list(request) == alone(engine, prompt, 12, **knobs), knobs
        assert scheduler.snapshot()["prefill_sizes"] == {"2": 1, "4": 1}  # 6 requests: a call of 4, then one of 2
    finally:
        scheduler.close()
    with pytest.raises(ValueError, match="power of two"):
        Scheduler(engine, prefill_rows=3)


def test_a_lone_request_decodes_one_row_in_rounds_of_several_steps_with_its_solo_tokens(engine):
    """With one chat in 8 slots each round runs only the first row (the fewest of 1, 4, 8 rows that cover the busy
    ones): the device loop's least (Engine.CHECK_EVERY, 8) after its prefill, then rounds of up to `chunk` steps,
    which give exactly the tokens of generate()."""
    scheduler = Scheduler(engine, slots=8, chunk=16)
    try:
        assert scheduler._step_rows() == [1, 4, 8]
        assert list(scheduler.submit(PROMPTS[2], max_tokens=30, temperature=0.9, seed=11)) == alone(engine, PROMPTS[2], 30, temperature=0.9, seed=11)
        stats = scheduler.snapshot()
        assert set(stats["batch_sizes"]) == {"1"}
        assert stats["steps"] > 8 and stats["rounds"] == 1 + -(-(stats["steps"] - 8) // 16)  # 8 steps, then rounds of 16 (the last may be short)
    finally:
        scheduler.close()


def test_a_calculator_call_ends_the_round_and_its_result_is_forced_in_the_next(tool_engine):
    """A row that closes a calculator call ends the round for every row; the host answers it and the next round
    forces the result. Beside another chat the tool call gets the same reply as generate() gives it alone, and the
    other chat its own solo tokens."""
    scheduler = Scheduler(tool_engine, slots=4)
    try:
        expected = [column[0] for column, _ in tool_engine.generate(TOOL_PROMPT, max_tokens=len(TOOL_REPLY) + 4, temperature=0.0)]
        expected = [t for t in expected if t not in tool_engine.stop_ids]
        other = scheduler.submit(PROMPTS[0], max_tokens=20, temperature=1.0, seed=3)
        call = scheduler.submit(TOOL_PROMPT, max_tokens=len(TOOL_REPLY) + 4, temperature=0.0)
        assert list(call) == expected and b"42" in bytes(t for t in expected if t < 256)
        assert list(other) == alone(tool_engine, PROMPTS[0], 20, temperature=1.0, seed=3)
    finally:
        scheduler.close()


def test_cancel_frees_the_row_and_full_context_stops(engine):
    scheduler = Scheduler(engine, slots=2)
    try:
        request = scheduler.submit(PROMPTS[0], max_tokens=1000, temperature=0.0)
        next(iter(request))
        request.cancel()
        list(request)  # ends without finishing the 1000 tokens
        assert request.finish_reason is None and scheduler.snapshot()["cancelled"] == 1
        # a long request stops when the 64-position context is full, with finish_reason "length"
        long = scheduler.submit([256] * 60, max_tokens=1000, temperature=0.0)
        assert len(list(long)) <= 64 - 60 + 1 and long.finish_reason in ("length", "stop")
        assert scheduler.snapshot()["busy_slots"] == 0
        with pytest.raises(ValueError, match="does not fit the context of 64"):
            scheduler.submit([256] * 64)
    finally:
        scheduler.close()


def test_warmup_compiles_every_shape_before_serving():
    """After warm-up, requests of any prompt length and length of reply trigger no compile."""
    model = GPT(CONFIG, rngs=nnx.Rngs(2))
    engine = Engine(model, BYTES)
    scheduler = Scheduler(engine, slots=3, warmup=True)
    try:
        assert scheduler.ready.wait(timeout=300)
        compiled = (engine._prefill._cache_size(), engine._loop._cache_size(), engine._insert._cache_size())
        for prompt in ([256] * 3, [256] * 20, [256] * 40):
            list(scheduler.submit(prompt, max_tokens=30, temperature=1.0, top_k=5))
        burst = [scheduler.submit([256] * n, max_tokens=5, temperature=1.0) for n in (2, 9, 33)]  # together: prefills of several rows
        for request in burst:
            list(request)
        assert (engine._prefill._cache_size(), engine._loop._cache_size(), engine._insert._cache_size()) == compiled
    finally:
        scheduler.close()
