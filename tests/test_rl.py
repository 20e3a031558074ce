"""RL (nanochat v1's REINFORCE with a per-question baseline): the advantage and nanochat's per-token
normalisation against hand-computed values, the masks, pass@k, the weighted train step, a tiny model whose
reward rises, and pipelines.chat_rl resuming to the same rollouts and losses."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import copy_of_base_run, metrics_rows, randomize, run_stage
from nanochat_jax.engine import Engine
from nanochat_jax.model import GPT, GPTConfig
from nanochat_jax.optim import build_optimizer
from nanochat_jax.rl import QuestionBatches, advantages, build_batch, pass_at_k, rollout, score
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tasks.common import Task
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train import make_train_step, shard_state

BYTES = Tokenizer([bytes([b]) for b in range(256)])  # 265 tokens with the specials: the model samples only real ones
CONFIG = GPTConfig(sequence_len=64, vocab_size=265, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def test_advantage_is_the_reward_minus_its_questions_mean():
    rewards = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], np.float32)
    np.testing.assert_allclose(advantages(rewards), [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [0.25, 0.25, 0.25, -0.75]])
    # --loss grpo: divided by the question's std (0.5 and sqrt(3)/4); all-equal samples stay at 0
    np.testing.assert_allclose(advantages(rewards, normalize=True), [[1, -1, -1, 1], [0, 0, 0, 0], [1 / 3**0.5] * 3 + [-3**0.5]],
                               rtol=1e-3)


def test_batch_trains_only_sampled_tokens_with_nanochats_per_token_weights():
    """Two questions x two samples. Sample (0, 1) had a calculator result forced into it (mask 0). Targets are
    -1 on the prompt, the forced tokens and the padding; weights are A / (E x the question's sampled tokens)."""
    prompts = [[1, 2, 3], [4, 5]]
    completions = [[[10, 11], [12, 13, 14, 15]], [[20], [21, 22]]]
    masks = [[[1, 1], [1, 0, 0, 1]], [[1], [1, 1]]]
    adv = np.array([[0.5, -0.5], [-1.0, 1.0]], np.float32)
    inputs, targets, weights = build_batch(prompts, completions, masks, adv, seq_len=64, pad_id=99)
    assert inputs.shape == targets.shape == weights.shape == (4, 64)  # padded to the smallest bucket
    np.testing.assert_array_equal(inputs[1, :7], [1, 2, 3, 12, 13, 14, 15][:-1] + [99])
    np.testing.assert_array_equal(targets[0, :5], [-1, -1, 10, 11, -1])  # the prompt predicts nothing trained
    np.testing.assert_array_equal(targets[1, :7], [-1, -1, 12, -1, -1, 15, -1])  # 13, 14 were forced
    np.testing.assert_array_equal(targets[3, :4], [-1, 21, 22, -1])
    assert (targets[:, 8:] == -1).all() and (inputs[:, 8:] == 99).all()  # padding
    # question 0 has 2 + 2 sampled tokens, question 1 has 1 + 2; E = 2
    np.testing.assert_allclose(weights[0, 2:4], 0.5 / (2 * 4))
    np.testing.assert_allclose(weights[1, [2, 5]], -0.5 / (2 * 4))
    np.testing.assert_allclose(weights[2, 1], -1.0 / (2 * 3))
    np.testing.assert_allclose(weights[3, 1:3], 1.0 / (2 * 3))
    assert weights[targets < 0].sum() == 0 and np.count_nonzero(weights) == 7


def test_pass_at_k_counts_a_question_solved_by_any_of_its_first_k_samples():
    outcomes = [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]
    assert pass_at_k(outcomes, 4) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 0.75}
    assert pass_at_k(outcomes, 8) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 0.75}  # no more than the samples drawn


def test_question_batches_walk_one_epoch_and_resume_from_their_state():
    q = QuestionBatches(10, 4)
    assert q.num_steps == 2 and next(q) == [0, 1, 2, 3]
    state = q.get_state()
    assert next(q) == [4, 5, 6, 7]
    with pytest.raises(StopIteration):
        next(q)
    q.set_state(state)
    assert next(q) == [4, 5, 6, 7]


def setup(lrs=None):
    model = randomize(GPT(CONFIG, rngs=nnx.Rngs(0)))
    tx = build_optimizer(CONFIG.n_embd, 30, warmdown_ratio=0.0, ns_dtype=jnp.float32, **(lrs or {}))
    graphdef, state = shard_state(model, tx, make_mesh("data=1", devices=jax.devices()[:1]))
    return graphdef, state, make_train_step(graphdef, state, weighted=True)


def test_weighted_step_loss_is_minus_the_advantage_weighted_log_likelihood():
    """The step's loss equals -sum(A x log p) / (E x tokens of the question), computed from the model's
    per-token losses by hand."""
    graphdef, state, step = setup()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 4, 16)).astype(np.int32)  # 2 micro-batches of 4 rows
    y = np.where(rng.random((2, 4, 16)) < 0.6, rng.integers(0, 256, (2, 4, 16)), -1).astype(np.int32)
    w = (rng.normal(size=(2, 4, 16)) * (y >= 0)).astype(np.float32)
    model = nnx.merge(graphdef, state)[0]
    logp = -np.stack([np.asarray(model(jnp.asarray(x[a]), jnp.asarray(y[a]), loss_reduction="none")) for a in range(2)])
    expected = -(w * logp).sum()
    _, metrics = step(state, x, y, w)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


class AsciiFirst(Task):
    """A reward the tiny model can learn: 1 if the completion's first byte is ASCII (about half at random)."""
    eval_type = "generative"

    def num_examples(self):
        return 1000

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"question {index}"}, {"role": "assistant", "content": "a"}]}

    def reward(self, conversation, completion):
        return float(bool(completion) and completion[0].isascii() and completion[0] != "\ufffd")


def test_mean_reward_rises_on_a_learnable_task():
    graphdef, state, step = setup(dict(matrix_lr=0.05, embedding_lr=0.3, unembedding_lr=0.05))
    task, engine = AsciiFirst(), Engine(nnx.merge(graphdef, state)[0], BYTES)
    questions, means = QuestionBatches(len(task), 4), []
    for s in range(30):
        engine.load_weights(nnx.merge(graphdef, state)[0])
        conversations, prompts, completions, masks = rollout(engine, BYTES, task, next(questions), 8, 2, 1.0, 0, seed=s)
        rewards = score(task, BYTES, conversations, completions)
        inputs, targets, weights = build_batch(prompts, completions, masks, advantages(rewards), CONFIG.sequence_len, pad_id=0)
        state, metrics = step(state, *(a.reshape(1, *a.shape) for a in (inputs, targets, weights)))
        means.append(float(rewards.mean()))
    assert means[0] < 0.6 and np.mean(means[-10:]) > 0.9, means  # about half at first, then nearly always


@pytest.fixture(scope="module")
def home(run_dir, tmp_path_factory):
    return copy_of_base_run(run_dir, tmp_path_factory)


FLAGS = ["--source", "base", "--tag", "d2", "--task", "SpellingBee", "--examples-per-step", "2", "--num-samples", "4",
         "--device-batch-size", "4", "--max-new-tokens", "8", "--num-iterations", "6", "--eval-every", "3",
         "--eval-examples", "4", "--eval-samples", "2", "--save-every", "3"]


def test_chat_rl_resumes_to_the_same_rollouts_and_losses(home):
    """Stopped after the step-3 checkpoint, then --resume: the same questions (the loader's state), the same
    sampling seeds and weights, so every logged rollout, reward, loss and pass@k equals the uninterrupted run's;
    and a report section with the reward curve."""
    run_stage(home, "pipelines.chat_rl", *FLAGS)
    full = metrics_rows(home / "rl_checkpoints" / "d2" / "metrics.jsonl")
    section = (home / "report" / "chat-rl.md").read_text()
    assert "chat_rl_curves.png" in section and "pass@2" in section and (home / "report" / "chat_rl_curves.png").is_file()
    shutil.rmtree(home / "rl_checkpoints" / "d2")
    run_stage(home, "pipelines.chat_rl", *FLAGS, "--max-steps", "3")
    out = run_stage(home, "pipelines.chat_rl", *FLAGS, "--resume")
    assert "resumed from step 3" in out
    resumed = metrics_rows(home / "rl_checkpoints" / "d2" / "metrics.jsonl")
    keys = ("step", "reward", "loss", "sampled_tokens", "seq_len", "pass@1", "pass@2")
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in full]
    assert [r["step"] for r in full if "reward" in r] == list(range(6))
