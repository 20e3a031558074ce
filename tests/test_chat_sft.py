"""pipelines.chat_sft end to end on a small base run: nanochat's geometry (32 examples a step, micro-batches of
4, so grad accum 8), an LR that falls linearly to exactly 0 and never below, padding to a few fixed lengths
with the non-padding share reported, and a resume that reproduces the uninterrupted run bit for bit."""
import shutil

import jax
import numpy as np
import pytest

from conftest import copy_of_base_run, metrics_rows, run_stage
from nanochat_jax.mixtures import identity
from nanochat_jax.model import GPTConfig
from nanochat_jax.optim import build_optimizer, lr_schedule
from nanochat_jax.sharding import make_mesh
from nanochat_jax.train import init_train_state, make_train_step

FLAGS = ["--source", "base", "--tag", "d2", "--mixture", "offline", "--mixture-fraction", "0.004", "--eval-every", "4",
         "--eval-steps", "2", "--eval-metrics-every", "-1"]


@pytest.fixture(scope="module")
def home(run_dir, tmp_path_factory):
    return copy_of_base_run(run_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(home):
    out = run_stage(home, "pipelines.chat_sft", *FLAGS)
    return out, metrics_rows(home / "sft_checkpoints" / "d2" / "metrics.jsonl"), (home / "report" / "chat-sft.md").read_text()


def test_lr_falls_linearly_to_exactly_zero_and_never_below():
    """lrm = 1 - step / T (nanochat v1 SFT), as the optimizer applies it: 0 at the end and after it."""
    f = lr_schedule(8, warmdown_ratio=1.0)
    values = np.array([float(f(k)) for k in range(12)])
    np.testing.assert_allclose(values[:9], 1 - np.arange(9) / 8, atol=1e-7)
    assert values[8] == 0.0 and (values >= 0).all()


def test_gradient_accumulation_advances_the_schedule_once_per_step():
    """nanochat PR #775 counted micro-batches as steps, ran the LR below zero and got NaNs: here 8 micro-batches
    make one optimizer update, so after T steps the count is T and the LR has just reached 0."""
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    T, A = 5, 8
    tx = build_optimizer(config.n_embd, T, warmdown_ratio=1.0)
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    graphdef, state = init_train_state(config, tx, mesh)
    step = make_train_step(graphdef, state)
    x = np.random.default_rng(0).integers(0, 64, (A, 2, 16)).astype(np.int32)
    for _ in range(T):
        state, metrics = step(state, x, x)
        assert np.isfinite(float(metrics["loss"]))
    counts = [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state) if "count" in jax.tree_util.keystr(path)]
    assert counts and set(counts) == {T}
    assert float(lr_schedule(T, warmdown_ratio=1.0)(counts[0])) == 0.0


def test_one_epoch_in_nanochats_geometry_with_padding_reported(full_run):
    out, rows, section = full_run
    assert "32 conversations per step = 4 x 1 devices x 8 grad accum" in out
    train = [r for r in rows if "loss" in r]
    steps = len(train)
    assert steps == (len(identity()) + 1 + 1 + 40) // 32  # identity (whole), 0.4% of 38 + 38 spelling rows and of 10K chitchat, one epoch
    np.testing.assert_allclose([r["lrm"] for r in train], 1 - np.arange(steps) / steps)
    assert {r["seq_len"] for r in train} <= {64}  # the context is 64: everything pads to it (or less)
    assert all(0 < r["trained"] < r["tokens"] for r in train)  # the loss is on the assistant's tokens only
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == len(set(range(0, steps, 4)) | {steps}) and val[-1] < val[0]  # every 4 steps and at the end
    assert "Non-padding token fraction" in section and "chitchat train: 40" in section and "chat_sft_curves.png" in section


def test_resume_reproduces_the_uninterrupted_run(home, full_run):
    shutil.rmtree(home / "sft_checkpoints" / "d2")
    run_stage(home, "pipelines.chat_sft", *FLAGS, "--max-steps", "3", "--save-every", "3")
    out = run_stage(home, "pipelines.chat_sft", *FLAGS, "--resume")
    assert "resumed from step 3" in out
    rows = metrics_rows(home / "sft_checkpoints" / "d2" / "metrics.jsonl")
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in full_run[1]]
    assert [r.get("val_loss") for r in rows] == [r.get("val_loss") for r in full_run[1]]
