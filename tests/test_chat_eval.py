"""Chat evals on a tiny GPT that has memorised the answers to a few real problems: three short ARC-Easy
questions (categorical) and two SpellingBee problems, whose answers call the calculator (generative).
The memorised ones must score, the others must not, whether batched or one by one, and the
`pipelines.chat_eval` command must report the same."""
import os
import subprocess
import sys

import pytest
from flax import nnx

from conftest import memorise
from evals.chat_eval import TASKS, chatcore, run_categorical, run_generative
from nanochat_jax.engine import Engine
from nanochat_jax.model import GPT, GPTConfig
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.gsm8k import assistant_text, extract_answer
from nanochat_jax.tasks.spellingbee import SpellingBee
from nanochat_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(REPO, "..", "shared", "data", "tasks")
pytestmark = pytest.mark.skipif(not os.path.isdir(TASKS_DIR), reason="no ../shared/data/tasks beside the checkout")
BYTES = Tokenizer([bytes([b]) for b in range(256)])  # the answer letters are single tokens


@pytest.fixture(scope="module")
def tasks():
    """(ARC-Easy test, SpellingBee test, the memorised ARC indices, the memorised SpellingBee indices):
    the shortest few of the first problems, to keep the training short."""
    arc, bee = ARC("ARC-Easy", "test", tasks_dir=TASKS_DIR), SpellingBee(size=8, split="test")
    length = lambda c: len(BYTES.render_conversation(c)[0])
    return arc, bee, sorted(range(40), key=lambda i: length(arc[i]))[:3], sorted(range(8), key=lambda i: length(bee[i]))[:2]


@pytest.fixture(scope="module")
def model(tasks):
    """Trained on the chosen ARC-Easy and SpellingBee problems with their answers (the answer tokens only)."""
    arc, bee, arc_seen, bee_seen = tasks
    model = GPT(GPTConfig(sequence_len=1024, vocab_size=272, n_layer=2, n_head=2, n_kv_head=2, n_embd=64), rngs=nnx.Rngs(0))
    loss = memorise(model, BYTES, [arc[i] for i in arc_seen] + [bee[i] for i in bee_seen], steps=150, lr=1e-2)
    assert loss < 0.01, loss  # it has memorised every answer token
    return model


def test_categorical_scores_the_memorised_letters(model, tasks):
    """The argmax over the letters at the prompt's end is the trained answer; batched equals one by one."""
    arc, _, seen, _ = tasks
    flags = run_categorical(model, BYTES, arc, seen, batch_tokens=4096)
    assert flags == [1, 1, 1]
    alone = [run_categorical(model, BYTES, arc, [i], batch_tokens=512)[0] for i in seen]
    assert alone == flags


def test_generative_decodes_together_and_the_calculator_answers(model, tasks):
    """The memorised SpellingBee answers come out word for word, their python call answered by the
    calculator; problems the model never saw fail. All five decode together, three rows a batch."""
    _, bee, _, seen = tasks
    problems = seen + [i for i in range(5) if i not in seen]
    flags, completions = run_generative(Engine(model, BYTES), BYTES, bee, problems, max_new_tokens=400, batch_size=3)
    assert flags[:2] == [1, 1]
    # an unseen problem whose count neither memorised answer gives cannot pass by luck
    counts = {extract_answer(assistant_text(bee[i])) for i in seen}
    assert all(not f for i, f in zip(problems[2:], flags[2:]) if extract_answer(assistant_text(bee[i])) not in counts)
    for i in range(2):
        ids, _ = BYTES.render_conversation(bee[problems[i]])
        reply = ids[len(BYTES.render_for_completion(bee[problems[i]])):-1]  # the trained answer, up to <|assistant_end|>
        assert completions[i][0] == BYTES.decode(reply)  # tool call, forced output and all


def test_chatcore_needs_all_six_tasks():
    accuracies = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.1, "HumanEval": 0.0, "SpellingBee": 0.5}
    assert chatcore(accuracies) == pytest.approx((1 / 3 + 0 + 0 + 0.1 + 0 + 0.5) / 6)
    del accuracies["SpellingBee"]
    assert chatcore(accuracies) is None
    assert [TASKS[n][1] for n in TASKS] == [0.25, 0.25, 0.25, 0.0, 0.0, 0.0]


def test_the_command_reports_each_task(model, tasks, tmp_path):
    """python -m pipelines.chat_eval on an export of the model scores what the library scores, and the
    accuracy lands in the report."""
    from nanochat_jax.export import save_export
    arc, _, seen, _ = tasks
    n = max(seen) + 1
    expected = sum(run_categorical(model, BYTES, arc, range(n), batch_tokens=8192))
    assert expected >= 3  # the memorised ones at least
    export = save_export(model, BYTES, str(tmp_path / "export"), dtype="float32", source={"stage": "sft", "tag": "t", "step": 150})
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-m", "pipelines.chat_eval", "--checkpoint", export, "-a", "ARC-Easy", "-x", str(n),
                             "--tasks-dir", TASKS_DIR], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ARC-Easy       accuracy {expected / n:.4f} ({expected}/{n})" in result.stdout
    report = open(tmp_path / "home" / "report" / "chat-evaluation-export.md").read()
    assert f"- ARC-Easy: {expected / n:.4f}" in report and f"| ARC-Easy | {expected / n:.4f} | {n} |" in report
