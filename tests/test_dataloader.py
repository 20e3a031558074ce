"""The pretraining loader on hand-made corpora, with a byte-level tokenizer so every token is readable:
both packing modes, exact resume at every step, per-process splits, epochs, the val split."""
import numpy as np
import pytest

from nanochat_jax.dataloader import make_loader, row_group_units
from nanochat_jax.dataset import write_shards
from nanochat_jax.tokenizer import Tokenizer

BYTES = Tokenizer([bytes([b]) for b in range(256)])  # token = byte, <|bos|> = 256
BOS = 256


def corpus(tmp_path, docs, docs_per_shard, num_val=1):
    return write_shards(docs, str(tmp_path / "shards"), docs_per_shard=docs_per_shard, num_val_docs=num_val)


def stream_of(docs):
    return np.concatenate([[BOS, *d.encode()] for d in docs])


def test_stream_packs_one_flat_token_stream(tmp_path):
    """nanochat v1: documents, each after a <|bos|>, back to back; each batch takes the next B·T+1 tokens."""
    docs = ["abc", "de", "fghij", "k", "lmnopq", "rs"]
    data = corpus(tmp_path, docs + ["val"], docs_per_shard=3)
    loader = make_loader(BYTES, batch_size=2, seq_len=3, data_dir=data, mode="stream")
    flat = stream_of(docs)
    for k in range(3):
        batch = next(loader)
        chunk = flat[k * 7:(k + 1) * 7]  # B·T + 1 = 7 tokens, the last one only as a target
        np.testing.assert_array_equal(batch["inputs"], chunk[:-1].reshape(2, 3))
        np.testing.assert_array_equal(batch["targets"], chunk[1:].reshape(2, 3))
        assert batch["inputs"].dtype == np.int32


def test_bestfit_rows_start_at_documents_and_crop_the_shortest(tmp_path):
    """nanochat HEAD: each row (T+1 = 8 tokens) takes the largest document that still fits; when none fits,
    the shortest is cropped to fill the row exactly and its tail is dropped."""
    docs = ["abcdef", "gh", "i", "jklm"]  # with <|bos|>: lengths 7, 3, 2, 5
    data = corpus(tmp_path, docs + ["val"], docs_per_shard=4)
    loader = make_loader(BYTES, batch_size=2, seq_len=7, data_dir=data, mode="bestfit", epochs=1)
    batch = next(loader)
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    a, g, i, j = ([BOS, *d.encode()] for d in docs)
    np.testing.assert_array_equal(rows[0], a + i[:1])  # 7 fits; then 1 left: nothing fits, crop "i" (2 tokens) to 1
    np.testing.assert_array_equal(rows[1], j + g)  # 5 then 3: exactly full
    assert all(rows[:, 0] == BOS)


@pytest.mark.parametrize("mode", ["stream", "bestfit"])
def test_resume_from_any_step_gives_identical_batches(tmp_path, mode):
    """Save the state after every batch; a fresh loader restored from it yields exactly the batch the
    uninterrupted loader yields next. 40 batches cross shard boundaries and several epochs."""
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh"), rng.integers(1, 30))) for _ in range(60)]
    data = corpus(tmp_path, docs + ["val"], docs_per_shard=7)  # 9 train shards, one row group each
    make = lambda: make_loader(BYTES, batch_size=3, seq_len=16, data_dir=data, mode=mode, buffer_docs=10)  # noqa: E731
    loader = make()
    epochs = set()
    for _ in range(40):
        state = loader.get_state()
        expected = next(loader)
        resumed = make()
        resumed.set_state(state)
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], expected["inputs"])
        np.testing.assert_array_equal(got["targets"], expected["targets"])
        epochs.add(loader.epoch())
    assert len(epochs) >= 3  # the run really went round the data several times


def test_state_round_trips_through_orbax(tmp_path):
    """The state is saved next to model checkpoints with orbax via grain's handler."""
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(50)]
    data = corpus(tmp_path, docs, docs_per_shard=9)
    loader = make_loader(BYTES, batch_size=2, seq_len=32, data_dir=data)
    for _ in range(7):
        next(loader)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
        mngr.wait_until_finished()
        expected = next(loader)
        resumed = make_loader(BYTES, batch_size=2, seq_len=32, data_dir=data)
        mngr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    np.testing.assert_array_equal(next(resumed)["inputs"], expected["inputs"])


def test_processes_read_disjoint_row_groups_covering_everything(tmp_path):
    """With 2 processes, process r reads row groups r, r+2, ... of the train split: disjoint, and together all."""
    docs = [f"doc{i:04d}" for i in range(5000)]
    data = corpus(tmp_path, docs, docs_per_shard=2048, num_val=100)  # shards of 2, 2 and 1 row groups
    units = [row_group_units("train", data, process_index=r, process_count=2) for r in range(2)]
    assert not set(units[0]) & set(units[1])
    assert len(units[0]) + len(units[1]) == 5
    seen = []
    for r in range(2):
        loader = make_loader(BYTES, batch_size=1, seq_len=7, data_dir=data, epochs=1, process_index=r, process_count=2)
        stream = np.concatenate([np.append(b["inputs"].ravel(), b["targets"][-1, -1]) for b in loader])  # B·T+1 each
        seen += bytes(np.where(stream == BOS, ord("|"), stream).astype(np.uint8)).decode().split("|")
    whole = [d for d in seen if len(d) == 7]  # complete documents; only the stream's last partial batch is cut
    assert len(whole) == len(set(whole)) > 4880  # no document read twice across the two processes
    assert set(whole) <= set(docs[:-100])


def test_val_split_is_read_once_and_deterministically(tmp_path):
    docs = [f"train {i}" for i in range(30)] + [f"held out {i}" for i in range(20)]
    data = corpus(tmp_path, docs, docs_per_shard=10, num_val=20)
    runs = [[b["inputs"] for b in make_loader(BYTES, batch_size=2, seq_len=8, split="val", data_dir=data)] for _ in range(2)]
    assert len(runs[0]) == len(runs[1]) > 0
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    text = bytes(np.concatenate(runs[0]).ravel()[np.concatenate(runs[0]).ravel() != BOS].astype(np.uint8)).decode()
    assert "held out" in text and "train" not in text


def test_mismatched_state_is_rejected(tmp_path):
    data = corpus(tmp_path, [f"d{i}" for i in range(20)], docs_per_shard=5)
    state = make_loader(BYTES, 1, 4, data_dir=data, mode="stream").get_state()
    with pytest.raises(ValueError, match="packing mode 'stream'"):
        make_loader(BYTES, 1, 4, data_dir=data, mode="bestfit").set_state(state)


def test_batches_become_one_global_array_over_data_and_fsdp(tmp_path):
    """Each process's rows go into one jax.Array whose batch dim is split over data × fsdp."""
    import jax
    from nanochat_jax.sharding import global_batch, make_mesh
    data = corpus(tmp_path, [f"doc {i}" for i in range(40)], docs_per_shard=10)
    batch = next(make_loader(BYTES, batch_size=8, seq_len=4, data_dir=data))
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    x = global_batch(batch["inputs"], mesh)
    assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert x.addressable_shards[0].data.shape == (2, 4)  # 8 rows over 4 data-parallel groups
    np.testing.assert_array_equal(np.asarray(x), batch["inputs"])
