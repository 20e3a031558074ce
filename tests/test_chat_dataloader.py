"""Conversation batches with a byte-level tokenizer, so every token is readable: midtraining's packed stream
(every token trained, exact resume, one epoch counted up front) and SFT's padded steps (the render mask,
a few fixed lengths, rows split over processes, the state is the step)."""
import numpy as np
import pytest

from nanochat_jax.chat_dataloader import RenderedConversations, SFTBatches, make_mid_loader, mid_stream_tokens, sft_buckets
from nanochat_jax.tasks.common import Task
from nanochat_jax.tokenizer import Tokenizer

BYTES = Tokenizer([bytes([b]) for b in range(256)])
S = BYTES.special_ids


class Chats(Task):
    """n short conversations whose texts say which one they are."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 7 + 1)}]}


def rendered(task):
    return np.concatenate([BYTES.render_conversation(task[i])[0] for i in range(len(task))])


def test_mid_stream_is_the_rendered_conversations_back_to_back():
    """Midtraining packs conversations like pretraining packs documents, user turns and all (mask ignored)."""
    task = Chats(600)
    loader = make_mid_loader(task, BYTES, batch_size=2, seq_len=16)
    flat = rendered(task)
    for k in range(5):
        batch = next(loader)
        window = flat[k * 33:(k + 1) * 33]
        np.testing.assert_array_equal(batch["inputs"], window[:-1].reshape(2, 16))
        np.testing.assert_array_equal(batch["targets"], window[1:].reshape(2, 16))
        assert (batch["targets"] >= 0).all()  # every token is trained


def test_one_epoch_is_counted_up_front_and_then_ends():
    task = Chats(300)
    tokens = mid_stream_tokens(task, BYTES)
    assert tokens == len(rendered(task))
    loader = make_mid_loader(task, BYTES, batch_size=2, seq_len=16)
    windows = tokens // 33
    for _ in range(windows):
        next(loader)
    with pytest.raises(StopIteration):
        next(loader)


def test_mid_loader_resumes_bit_for_bit_from_its_state():
    task = Chats(700)
    loader = make_mid_loader(task, BYTES, batch_size=2, seq_len=32)
    for _ in range(9):
        next(loader)
    state = loader.get_state()
    expected = [next(loader) for _ in range(4)]
    resumed = make_mid_loader(task, BYTES, batch_size=2, seq_len=32)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])


def test_processes_take_disjoint_chunks_of_conversations():
    task = Chats(1000)
    shares = [RenderedConversations(task, BYTES, chunk=64, process_index=p, process_count=3) for p in range(3)]
    chunks = sorted(c for share in shares for c in share.units)
    assert chunks == list(range(16))  # ceil(1000 / 64) chunks, each read by exactly one process
    assert sum(mid_stream_tokens(task, BYTES, p, 3) for p in range(3)) == len(rendered(task))


# -----------------------------------------------------------------------------
# SFT


def test_sft_targets_are_the_assistant_tokens_only_and_padding_is_ignored():
    task = Chats(64)
    loader = SFTBatches(task, BYTES, examples_per_step=8, grad_accum=2, global_rows=4, seq_len=64)
    batch = next(loader)
    assert batch["inputs"].shape == (2, 4, 64)  # (grad accum, rows, the smallest bucket that fits)
    for r in range(8):
        ids, mask = BYTES.render_conversation(task[r])
        x, y = batch["inputs"][r // 4, r % 4], batch["targets"][r // 4, r % 4]
        n = len(ids) - 1
        np.testing.assert_array_equal(x[:n], ids[:-1])
        assert (x[n:] == S["<|assistant_end|>"]).all()  # padding, as nanochat pads
        trained = [t for t in y if t >= 0]
        assert BYTES.decode(trained[:-1]) == "a" * (r % 7 + 1) and trained[-1] == S["<|assistant_end|>"]
        assert (y[n:] == -1).all()
    assert batch["trained"] == int((batch["targets"] >= 0).sum())
    assert batch["tokens"] == sum(len(BYTES.render_conversation(task[r])[0]) - 1 for r in range(8))


def test_sft_pads_a_step_to_one_of_a_few_lengths():
    assert sft_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert sft_buckets(300) == [64, 128, 256, 300]

    class Long(Chats):
        def get_example(self, i):
            return {"messages": [{"role": "user", "content": "x" * (50 * i)}, {"role": "assistant", "content": "y"}]}

    loader = SFTBatches(Long(8), BYTES, examples_per_step=2, grad_accum=1, global_rows=2, seq_len=300)
    lengths = [next(loader)["inputs"].shape[-1] for _ in range(4)]
    assert lengths == [64, 256, 256, 300]  # the step's longest conversation picks the bucket (255 inputs fit 256; 300 truncates)


def test_sft_rows_split_over_processes_and_the_state_is_the_step():
    task = Chats(100)
    whole = SFTBatches(task, BYTES, 8, 2, 4, 64)
    halves = [SFTBatches(task, BYTES, 8, 2, 4, 64, process_index=p, process_count=2) for p in range(2)]
    assert whole.num_steps == 12  # 100 // 8: the last partial step is dropped
    for _ in range(3):
        full, parts = next(whole), [next(h) for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts], axis=1), full["inputs"])
    resumed = SFTBatches(task, BYTES, 8, 2, 4, 64)
    resumed.set_state(whole.get_state())
    np.testing.assert_array_equal(next(resumed)["targets"], next(whole)["targets"])
    with pytest.raises(ValueError, match="examples per step"):
        SFTBatches(task, BYTES, 10, 2, 4, 64)
