"""The jitted train and eval steps: accumulation, donation, no recompiles, per-token eval loss."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from nanochat_jax.model import GPTConfig
from nanochat_jax.optim import build_optimizer
from nanochat_jax.sharding import global_batch, make_mesh
from nanochat_jax.train import init_train_state, make_eval_step, make_train_step

CONFIG = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("data=1", devices=jax.devices()[:1])


def batch(shape, seed=0):
    tokens = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (*shape, CONFIG.sequence_len + 1), dtype=np.int32)
    return tokens[..., :-1], tokens[..., 1:]


def update_of_one_step(mesh, x, y):
    """(loss, per-tensor parameter change) of one plain SGD step: its update is -lr * gradient, linear in
    the gradient, so it compares gradients themselves. (An Adam step turns a near-zero gradient into about
    lr * sign(g), which float rounding decides and which differs between CPUs.)"""
    graphdef, state = init_train_state(CONFIG, optax.sgd(1.0), mesh)
    before = [np.array(p) for p in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))]
    state, metrics = make_train_step(graphdef, state)(state, *(global_batch(a, mesh, batch_axis=1) for a in (x, y)))
    model, _ = nnx.merge(graphdef, state)
    after = jax.tree.leaves(nnx.state(model, nnx.Param))
    return float(metrics["loss"]), [np.asarray(a) - b for a, b in zip(after, before)]


def test_gradient_accumulation_equals_one_big_batch(mesh):
    """2 micro-batches of 2 rows give the same gradient as 1 batch of 4 rows (each micro-batch has the
    same number of target tokens, so the mean of means is the mean)."""
    x, y = batch((1, 4))
    loss_big, update_big = update_of_one_step(mesh, x, y)
    loss_acc, update_acc = update_of_one_step(mesh, x.reshape(2, 2, -1), y.reshape(2, 2, -1))
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    assert sum(np.linalg.norm(a) > 0 for a in update_big) >= 3  # embedding, lm_head, output projections (the rest starts at 0)
    for a, b in zip(update_big, update_acc):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)  # fp32 summation order only


def test_step_donates_state_and_schedules_never_recompile(mesh):
    """The old state's buffers are reused in place, and 5 steps through a changing LR and momentum
    schedule run on one compiled program."""
    tx = build_optimizer(CONFIG.n_embd, num_iterations=5, warmup_ratio=0.2, warmdown_ratio=0.4)
    graphdef, state = init_train_state(CONFIG, tx, mesh)
    step = make_train_step(graphdef, state)
    losses = []
    x, y = (global_batch(a, mesh, batch_axis=1) for a in batch((1, 2)))
    for s in range(5):
        old = jax.tree.leaves(state)[0]
        state, metrics = step(state, x, y)
        assert old.is_deleted()
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["grad_norm"]))
    assert step._cache_size() == 1
    assert losses[-1] < losses[0]  # it learns the batch it keeps seeing


def test_eval_step_returns_per_token_loss(mesh):
    graphdef, state = init_train_state(CONFIG, optax.identity(), mesh)
    x, y = batch((2,))
    y = y.copy()
    y[:, :4] = -1
    per_token = make_eval_step(graphdef, mesh)(state, x, y)
    model, _ = nnx.merge(graphdef, state)
    assert per_token.shape == x.shape and not np.any(np.asarray(per_token)[:, :4])
    assert float(per_token.sum() / (y >= 0).sum()) == pytest.approx(float(model(x, y)), rel=1e-6)
