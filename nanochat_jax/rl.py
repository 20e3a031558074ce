"""
nanochat v1's reinforcement learning (spec §8.4): on-policy REINFORCE with a per-question baseline, which
nanochat calls GRPO. A step samples N completions of each of E questions through the engine's device loop,
scores them with the task's reward (1 for a right final answer, else 0), and takes one optimizer step on

    loss = sum over questions q, samples i, sampled tokens t of  w_qi * (-log p(token_t))
    w_qi = (r_qi - mean_i r_qi) / (E * sampled tokens of question q's N samples)

the advantage without a std division, no KL and no ratio; the normalisation is nanochat's per-token one
(with one pass per question). Trained tokens are the sampled ones only: not the prompt, not the calculator's
output that the engine forced into the stream, not padding.
"""
import time

import grain
import numpy as np
from flax import nnx

from nanochat_jax.chat_dataloader import sft_buckets
from nanochat_jax.sharding import global_batch

PAD_TARGET = -1


class QuestionBatches(grain.DatasetIterator):
    """Step s -> the task indices s·E .. s·E + E - 1, one epoch (len(task) // E steps). The state is the next
    step, so a resumed run asks the same questions as the uninterrupted one."""

    def __init__(self, num_examples, examples_per_step):
        super().__init__()
        self.E, self.num_steps, self.step = examples_per_step, num_examples // examples_per_step, 0

    def __next__(self):
        if self.step >= self.num_steps:
            raise StopIteration
        first = self.step * self.E
        self.step += 1
        return list(range(first, first + self.E))

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


def longest_prompt(tokenizer, task):
    """Tokens in the task's longest rendered prompt: rollouts shaped for it compile once per run, not whenever a
    step's questions happen to be longer than every step's before."""
    return max(len(tokenizer.render_for_completion(task[i])) for i in range(len(task)))


def rollout(engine, tokenizer, task, indices, num_samples, max_new_tokens, temperature, top_k, seed, prompt_len=None):
    """Sample num_samples completions of each question on the engine's device loop: (conversations, prompts,
    completions, masks), masks being the engine's (0 where the calculator forced a token). prompt_len: the
    shapes' prompt length (longest_prompt of the task), as Engine.generate_many takes it."""
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    completions, masks = engine.generate_many(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                              temperature=temperature, top_k=top_k, seed=seed, prompt_len=prompt_len)
    return conversations, prompts, completions, masks


def score(task, tokenizer, conversations, completions):
    """The task's reward of every completion: (E, N) float32."""
    return np.array([[float(task.reward(c, tokenizer.decode(s))) for s in samples] for c, samples in zip(conversations, completions)],
                    np.float32)


def advantages(rewards, normalize=False):
    """(E, N) rewards -> each minus the mean of its question's samples (nanochat); normalize=True also divides
    by the samples' std (GRPO's advantage; a question whose samples all scored the same stays at 0)."""
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    return centred / (rewards.std(axis=1, keepdims=True) + 1e-4) if normalize else centred


def build_batch(prompts, completions, masks, adv, seq_len, pad_id):
    """The training rows of a step: (inputs, targets, weights), each (E·N, L), row q·N + i being sample i of
    question q (prompt + completion). Targets are -1, and weights 0, on the prompt, on forced tokens and on
    padding; a sampled token's weight is its sample's advantage over (E x the question's sampled tokens)."""
    E, N = adv.shape
    rows = [(p, c, m) for p, samples, sample_masks in zip(prompts, completions, masks) for c, m in zip(samples, sample_masks)]
    longest = min(seq_len, max(len(p) + len(c) for p, c, _ in rows) - 1)
    L = next(b for b in sft_buckets(seq_len) if b >= longest)  # SFT's few padded lengths: few shapes compile
    inputs = np.full((E * N, L), pad_id, np.int32)
    targets = np.full((E * N, L), PAD_TARGET, np.int32)
    for r, (p, c, m) in enumerate(rows):
        ids = np.asarray(p + c, np.int32)[:L + 1]
        trained = np.concatenate([np.zeros(len(p), bool), np.asarray(m, bool)])[:L + 1]
        n = len(ids) - 1
        inputs[r, :n] = ids[:-1]
        targets[r, :n] = np.where(trained[1:], ids[1:], PAD_TARGET)  # a target is trained where its token was sampled
    valid = (targets >= 0).reshape(E, N, L)
    per_question = np.maximum(valid.sum(axis=(1, 2)), 1)  # sampled tokens of each question's N samples
    weights = valid * (adv / (E * per_question[:, None]))[:, :, None]
    return inputs, targets, weights.reshape(E * N, L).astype(np.float32)


def pass_at_k(outcomes, max_k):
    """outcomes (Q, N) 1/0 -> {k: share of questions solved by one of their first k samples}, k = 1..max_k."""
    outcomes = np.asarray(outcomes, bool)
    return {k: float(outcomes[:, :k].any(axis=1).mean()) for k in range(1, min(max_k, outcomes.shape[1]) + 1)}


def train_on_rollouts(state, graphdef, train_step, engine, tokenizer, task, indices, mesh, micro_rows, pad_id, num_samples,
                      max_new_tokens, temperature, top_k, seed, normalize=False, prompt_len=None):
    """One RL step: refresh the engine from state, roll out num_samples completions of each question, score them
    and take the weighted update in micro-batches of micro_rows rows. Returns (state, figures): the loss, the
    mean reward, the sampled tokens, the padded length and the seconds of each phase."""
    t0 = time.perf_counter()
    engine.load_weights(nnx.merge(graphdef, state)[0])
    conversations, prompts, completions, masks = rollout(engine, tokenizer, task, indices, num_samples, max_new_tokens,
                                                         temperature, top_k, seed, prompt_len)
    t1 = time.perf_counter()
    rewards = score(task, tokenizer, conversations, completions)
    t2 = time.perf_counter()
    inputs, targets, weights = build_batch(prompts, completions, masks, advantages(rewards, normalize), engine.max_len, pad_id)
    shape = (inputs.shape[0] // micro_rows, micro_rows, inputs.shape[1])
    state, metrics = train_step(state, *(global_batch(a.reshape(shape), mesh, batch_axis=1) for a in (inputs, targets, weights)))
    loss = float(metrics["loss"])  # syncs: the update's time is in update_s
    t3 = time.perf_counter()
    return state, {"loss": loss, "metrics": metrics, "reward": float(rewards.mean()),
                   "sampled_tokens": sum(len(c) for samples in completions for c in samples), "seq_len": int(inputs.shape[1]),
                   "rollout_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2, "dt": t3 - t0}
