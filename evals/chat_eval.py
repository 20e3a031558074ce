"""
Chat evals (nanochat v1 chat_eval), batched:
- categorical (ARC-Easy, ARC-Challenge, MMLU): each problem's completion prompt, the logits at its last
  position, argmax over the answer letters' token ids only. Prompts are sorted by length into a few fixed
  shapes, thousands a forward pass, and only the letters' logits come back to the host.
- generative (GSM8K, HumanEval, SpellingBee): num_samples completions per problem (greedy by default) with
  the calculator tool, every problem decoded together through Engine.generate_many, batch_size rows at a
  time; a problem passes if any sample does. HumanEval's programs run in parallel in the sandbox.
- ChatCORE = the mean over the six tasks of (acc - baseline) / (1 - baseline), baseline 0.25 for the
  multiple-choice tasks and 0 for the generative ones; only reported when all six ran.
- self checks, on prompts no training mixture holds (nanochat_jax/tasks/identity_heldout.json): the share of
  50 general prompts whose greedy reply ends with <|assistant_end|> within 128 tokens, and of 20 paraphrased
  questions about the model whose reply names the project.
One process, one device: the engine decodes on the first device (see Engine).
"""
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.spellingbee import SpellingBee

# nanochat v1's six tasks, in its order, with their random baselines
TASKS = {
    "ARC-Easy": (lambda tasks_dir: ARC("ARC-Easy", "test", tasks_dir=tasks_dir), 0.25),
    "ARC-Challenge": (lambda tasks_dir: ARC("ARC-Challenge", "test", tasks_dir=tasks_dir), 0.25),
    "MMLU": (lambda tasks_dir: MMLU("all", "test", tasks_dir=tasks_dir), 0.25),
    "GSM8K": (lambda tasks_dir: GSM8K("main", "test", tasks_dir=tasks_dir), 0.0),
    "HumanEval": (lambda tasks_dir: HumanEval(tasks_dir=tasks_dir), 0.0),
    "SpellingBee": (lambda tasks_dir: SpellingBee(size=256, split="test"), 0.0),
}
HELDOUT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat_jax", "tasks", "identity_heldout.json")
PROJECT_NAME = re.compile(r"nanochat[ _-]?jax", re.IGNORECASE)
LENGTH_BUCKETS = [64, 128, 256, 512, 1024, 2048, 4096]  # padded prompt lengths of the categorical batches


# -----------------------------------------------------------------------------
# Categorical: the answer letters' logits at the end of the prompt

def _letter_logits_fn(graphdef):
    def letter_logits(state, ids, last, letters):
        """ids (B, T) right-padded prompts, last (B,) each one's final position, letters (B, C) token ids:
        the logits of those tokens at that position (B, C). Never more than (B, V) logits."""
        model = nnx.merge(graphdef, state)
        h = model.features(ids)[jnp.arange(ids.shape[0]), last]  # (B, D)
        return jnp.take_along_axis(model.logits(h), letters, axis=-1)
    return jax.jit(letter_logits)


def run_categorical(model, tokenizer, task, indices, batch_tokens=262_144):
    """1/0 per problem in indices: is the argmax over its letters the right letter?"""
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    letter_ids = []
    for c in conversations:
        ids = [tokenizer.encode(letter) for letter in c["letters"]]
        if any(len(t) != 1 for t in ids):
            raise ValueError(f"answer letters {c['letters']} are not single tokens for this tokenizer")
        letter_ids.append([t[0] for t in ids])
    C = max(len(x) for x in letter_ids)
    graphdef, state = nnx.split(model)
    letter_logits = _letter_logits_fn(graphdef)
    bos = tokenizer.get_bos_token_id()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    choice = np.zeros(len(prompts), np.int64)
    i = 0
    while i < len(order):
        T = next((b for b in LENGTH_BUCKETS if b >= len(prompts[order[i]])), None) or len(prompts[order[i]])
        B = min(max(1, batch_tokens // T), 1 << (len(order) - i - 1).bit_length())  # powers of two at the tail: few compiles
        rows = [j for j in order[i:i + B] if len(prompts[j]) <= T]
        ids = np.full((B, T), bos, np.int32)
        last, letters = np.zeros(B, np.int32), np.zeros((B, C), np.int32)
        for r, j in enumerate(rows):
            ids[r, :len(prompts[j])] = prompts[j]
            last[r] = len(prompts[j]) - 1
            letters[r, :len(letter_ids[j])] = letter_ids[j]
        logits = np.asarray(letter_logits(state, ids, last, letters))
        for r, j in enumerate(rows):
            choice[j] = int(np.argmax(logits[r, :len(letter_ids[j])]))
        i += len(rows)
    return [int(c["letters"][k] == c["messages"][-1]["content"]) for c, k in zip(conversations, choice)]


# -----------------------------------------------------------------------------
# Generative: decode everything together, then grade

def grade(task, conversations, completions):
    """1/0 per problem: does any of its completions pass? HumanEval's programs run in parallel in the sandbox."""
    if isinstance(task, HumanEval):
        from evals.sandbox import run_programs
        programs = [task.program(c, s) for c, samples in zip(conversations, completions) for s in samples]
        outcomes = iter(r.passed for r in run_programs(programs, timeout=task.timeout))
        passed = [[next(outcomes) for _ in samples] for samples in completions]
    else:
        passed = [[task.evaluate(c, s) for s in samples] for c, samples in zip(conversations, completions)]
    return [int(any(p)) for p in passed]


def run_generative(engine, tokenizer, task, indices, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50, batch_size=256):
    """1/0 per problem in indices, plus the completions (text) of each problem."""
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    results, _ = engine.generate_many(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, batch_size=batch_size)
    completions = [[tokenizer.decode(sample) for sample in samples] for samples in results]
    return grade(task, conversations, completions), completions


# -----------------------------------------------------------------------------

def chatcore(accuracies):
    """Mean centred accuracy over nanochat v1's six tasks; None unless all six are there."""
    if set(accuracies) != set(TASKS):
        return None
    return sum((accuracies[name] - TASKS[name][1]) / (1 - TASKS[name][1]) for name in TASKS) / len(TASKS)


def evaluate_chat(model, engine, tokenizer, task_names=tuple(TASKS), max_problems=None, tasks_dir=None, num_samples=1,
                  max_new_tokens=512, temperature=0.0, top_k=50, batch_size=256, batch_tokens=262_144, log=print):
    """Run the named tasks; returns {"results": {name: accuracy}, "ChatCORE": float | None,
    "timings": {name: seconds}, "problems": {name: count}}."""
    out = {"results": {}, "timings": {}, "problems": {}}
    for name in task_names:
        t0 = time.perf_counter()
        task = TASKS[name][0](tasks_dir)
        n = len(task) if max_problems is None else min(max_problems, len(task))
        if task.eval_type == "categorical":
            flags = run_categorical(model, tokenizer, task, range(n), batch_tokens)
        else:
            flags, _ = run_generative(engine, tokenizer, task, range(n), num_samples, max_new_tokens, temperature, top_k, batch_size)
        flags = np.asarray(flags)
        out["results"][name], out["problems"][name] = float(flags.mean()) if n else 0.0, n
        out["timings"][name] = time.perf_counter() - t0
        log(f"{name:14s} accuracy {out['results'][name]:.4f} ({int(flags.sum())}/{n}) in {out['timings'][name]:.1f}s")
    out["ChatCORE"] = chatcore(out["results"])
    return out


def self_checks(engine, tokenizer, max_new_tokens=128, batch_size=256):
    """{"stops": share of the general prompts answered with <|assistant_end|> within max_new_tokens, "names_itself":
    share of the identity questions whose reply names nanochat_jax}, plus a few (prompt, reply) pairs to read."""
    with open(HELDOUT_PATH, encoding="utf-8") as f:
        heldout = json.load(f)
    texts = heldout["general"] + heldout["identity"]
    prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": ""}]})
               for t in texts]
    results, _ = engine.generate_many(prompts, max_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    replies = [samples[0] for samples in results]  # the stop token is not included: shorter than the limit = it stopped
    general, identity = replies[:len(heldout["general"])], replies[len(heldout["general"]):]
    out = {"stops": float(np.mean([len(r) < max_new_tokens for r in general])),
           "names_itself": float(np.mean([bool(PROJECT_NAME.search(tokenizer.decode(r))) for r in identity]))}
    examples = [(t, tokenizer.decode(r)) for t, r in zip(heldout["general"][:3] + heldout["identity"][:3], general[:3] + identity[:3])]
    return out, examples
