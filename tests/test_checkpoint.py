"""Checkpoints: a killed run resumes bit for bit, a checkpoint restores onto another mesh, and a
damaged checkpoint is reported (or skipped when asked), never silently used or overwritten."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.checkpoint import CheckpointError, Checkpointer
from nanochat_jax.dataloader import make_loader
from nanochat_jax.dataset import _sotu_documents
from nanochat_jax.model import GPTConfig
from nanochat_jax.optim import build_optimizer
from nanochat_jax.sharding import global_batch, make_mesh
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train import abstract_train_state, init_train_state, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = GPTConfig(sequence_len=16, vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)  # >= 265 tokens, divisible by the mesh
BYTES = Tokenizer([bytes([b]) for b in range(256)])  # 265 tokens with the specials


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home with a small tokenizer trained on the embedded corpus (base_train loads it from there)."""
    home = tmp_path_factory.mktemp("home")
    Tokenizer.train_from_iterator(iter(_sotu_documents()[:200]), 512).save(str(home / "tokenizer"))
    return home


def base_train(home, *flags):
    cmd = [sys.executable, "-m", "pipelines.base_train", "--depth", "2", "--max-seq-len", "32", "--device-batch-size", "4",
           "--total-batch-size", "256", "--num-iterations", "30", "--eval-every", "-1", "--eval-tokens", "1024",
           "--sample-every", "-1", "--save-every", "5", "--keep", "3", *flags]
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_NUM_CPU_DEVICES="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(home, tag):
    with open(home / "base_checkpoints" / tag / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_run_killed_after_a_save_resumes_bit_for_bit(home):
    """SIGKILL right after a checkpoint lands, then --resume: every loss equals the uninterrupted run's
    exactly (same batches from the restored loader state, same params and optimizer state)."""
    full = base_train(home, "--tag", "full")
    assert full.wait(timeout=600) == 0, full.stdout.read()

    killed = base_train(home, "--tag", "killed")
    step_dir = home / "base_checkpoints" / "killed" / "10"
    deadline = time.time() + 600
    while not step_dir.is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # orbax renames the step directory into place only once it is complete
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    resumed = base_train(home, "--tag", "killed", "--resume")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    resumed_from = int(out.split("resumed from step ")[1].split()[0])
    assert 10 <= resumed_from < 30
    a, b = metrics(home, "full"), metrics(home, "killed")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(31))
    assert [r.get("loss") for r in b] == [r.get("loss") for r in a]  # bitwise: JSON keeps every float digit
    assert b[-1]["val_bpb"] == a[-1]["val_bpb"]


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(home):
    """Resume with an infinite Muon lr: the first update makes the params inf, the run stops with a clear
    message, and the checkpoint it resumed from is untouched (no new one is written); nor may a fresh run
    start over it."""
    good = base_train(home, "--tag", "nan", "--num-iterations", "10")
    assert good.wait(timeout=600) == 0, good.stdout.read()
    ckpt = home / "base_checkpoints" / "nan"
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    bad = base_train(home, "--tag", "nan", "--num-iterations", "20", "--resume", "--matrix-lr", "inf")
    out = bad.communicate(timeout=600)[0]
    assert bad.returncode == 1 and "step 10: the update made some parameters NaN or inf; stopping without saving" in out, out
    after = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    assert after == before and sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["10", "5"]

    # a fresh run (no --resume) into the same tag is refused: orbax would keep steps 5 and 10 and skip its saves
    fresh = base_train(home, "--tag", "nan", "--num-iterations", "10")
    out = fresh.communicate(timeout=600)[0]
    assert fresh.returncode == 1 and "already holds checkpoints (latest step 10): pass --resume" in out, out
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file() and p.name != "metrics.jsonl"} == before


def train_steps(step, state, loader, mesh, n):
    losses = []
    for _ in range(n):
        batch = next(loader)
        x, y = (global_batch(batch[k][None], mesh, batch_axis=1) for k in ("inputs", "targets"))
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    """Saved from an 8-device data×fsdp×tensor mesh; restored on 1 device and on data=4,fsdp=2 the next losses agree."""
    data = tmp_path / "data"
    from nanochat_jax.dataset import write_shards
    write_shards([f"text number {i} " * (i % 7 + 2) for i in range(200)], str(data), docs_per_shard=64, num_val_docs=20)
    tx = build_optimizer(CONFIG.n_embd, num_iterations=20, ns_dtype=jnp.float32)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, state = init_train_state(CONFIG, tx, mesh)
    step = make_train_step(graphdef, state)
    loader = make_loader(BYTES, 8, CONFIG.sequence_len, data_dir=str(data))
    state, _ = train_steps(step, state, loader, mesh, 2)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, state, loader, {"step": 2})
    ckpt.wait()
    _, expected = train_steps(step, state, loader, mesh, 3)

    for spec, devices in [("data=1", jax.devices()[:1]), ("data=4,fsdp=2", jax.devices())]:
        other = make_mesh(spec, devices=devices)
        _, abstract = abstract_train_state(CONFIG, tx, other)
        fresh_loader = make_loader(BYTES, 8, CONFIG.sequence_len, data_dir=str(data))
        restored, meta = Checkpointer(tmp_path / "ckpt").restore(None, abstract, fresh_loader)
        assert meta["step"] == 2
        leaf = jax.tree.leaves(restored)[-1]
        assert leaf.sharding.mesh.shape == other.shape  # laid out on the new mesh, not the saved one
        _, losses = train_steps(make_train_step(graphdef, restored), restored, fresh_loader, other, 3)
        np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-5)


def test_damaged_checkpoint_is_reported_or_skipped_never_used(tmp_path):
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    tx = build_optimizer(CONFIG.n_embd, num_iterations=None)
    graphdef, state = init_train_state(CONFIG, tx, mesh)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    for s in (1, 2):
        ckpt.save(s, state, make_loader(BYTES, 1, 4, data_dir=_tiny_data(tmp_path)), {"step": s})
    ckpt.wait()
    for root, _, files in os.walk(tmp_path / "ckpt" / "2" / "state"):  # truncate every file of step 2's arrays
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(f.name) // 3))
    _, abstract = abstract_train_state(CONFIG, tx, mesh)
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 in .* is unreadable .*--fallback"):
        Checkpointer(tmp_path / "ckpt").restore(None, abstract)
    assert (tmp_path / "ckpt" / "2").is_dir()  # reporting it changes nothing on disk
    restored, meta = Checkpointer(tmp_path / "ckpt").restore(None, abstract, fallback=True)
    assert meta["step"] == 1
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("corrupt-2-")]  # kept aside for a look
    again = Checkpointer(tmp_path / "ckpt")
    again.save(2, restored, make_loader(BYTES, 1, 4, data_dir=_tiny_data(tmp_path)), {"step": 2})  # the step can be saved anew
    again.wait()
    assert again.restore(None, abstract)[1]["step"] == 2


def _tiny_data(tmp_path):
    from nanochat_jax.dataset import write_shards
    path = tmp_path / "tiny_data"
    if not path.is_dir():
        write_shards([f"doc {i}" for i in range(30)], str(path), docs_per_shard=10, num_val_docs=5)
    return str(path)


@pytest.mark.parametrize("dtype, tol", [("float32", 0), ("bfloat16", 0.05)])
def test_export_holds_the_params_the_tokenizer_and_the_config(tmp_path, monkeypatch, dtype, tol):
    """`python -m nanochat_jax.export` writes params only; loading it gives the trained model's logits."""
    from flax import nnx
    from nanochat_jax.checkpoint import checkpoint_dir
    from nanochat_jax.export import load_export
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path / "home"))
    BYTES.save(str(tmp_path / "home" / "tokenizer"))
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    graphdef, state = init_train_state(CONFIG, build_optimizer(CONFIG.n_embd, num_iterations=None), mesh)
    model, _ = nnx.merge(graphdef, state)
    ckpt = Checkpointer(checkpoint_dir("base", "exp"))
    ckpt.save(7, state, make_loader(BYTES, 1, 4, data_dir=_tiny_data(tmp_path)), {"step": 7, "model_config": CONFIG.__dict__})
    ckpt.wait()
    out = tmp_path / "export"
    result = subprocess.run([sys.executable, "-m", "nanochat_jax.export", "--tag", "exp", "--out", str(out), "--dtype", dtype],
                            cwd=REPO, env=dict(os.environ, NANOCHAT_JAX_HOME=str(tmp_path / "home")), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["config.json", "params", "tokenizer"]
    loaded, tokenizer, info = load_export(str(out))
    assert info["source"] == {"stage": "base", "tag": "exp", "step": 7} and tokenizer.get_vocab_size() == 265
    assert jax.tree.leaves(nnx.state(loaded, nnx.Param))[0].dtype == jnp.dtype(dtype)
    x = jnp.arange(32).reshape(2, 16) % 265
    np.testing.assert_allclose(loaded(x), model(x), atol=tol, rtol=0)
