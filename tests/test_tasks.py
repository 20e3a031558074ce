"""
The chat tasks (nanochat_jax/tasks/), module by module: slicing and mixing, the multiple-choice
prompt, GSM8K's tool-call parts and their loss mask, HumanEval's programs, the synthetic spelling
tasks, SmolTalk / CustomJSON files, ChitChat's packaged conversations, and where the data comes
from (a tasks directory, the hub, or a clear error). Real rows come from ../shared/data/tasks (see
shared/data/TASKS.md); the tests that need them skip when that directory is absent. The hub is only
ever a loopback server here.
"""
import gzip
import hashlib
import http.server
import io
import json
import os
import random
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.chitchat import ChitChat, load_conversations
from nanochat_jax.tasks.common import Task, TaskDataError, TaskMixture, TaskSequence, render_mc
from nanochat_jax.tasks.customjson import CustomJSON
from nanochat_jax.tasks.gsm8k import GSM8K, extract_answer, solution_parts
from nanochat_jax.tasks.humaneval import HumanEval, extract_code, extract_imports
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.spellingbee import TEST_SEED_OFFSET, SimpleSpelling, SpellingBee, download_word_list, load_words
from nanochat_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(REPO, "..", "shared", "data", "tasks")
WORDS_GZ = os.path.join(REPO, "..", "shared", "data", "words_alpha.txt.gz")
needs_data = pytest.mark.skipif(not os.path.isdir(TASKS_DIR), reason=f"no task data at {TASKS_DIR}")


def raw_rows(name):
    """A shared data file's rows in their original order."""
    with gzip.open(os.path.join(TASKS_DIR, f"{name}.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


class Numbers(Task):
    """A fake task whose example i is {"messages": [], "n": offset + i}: easy to check slices against."""

    def __init__(self, size, offset=0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.offset = size, offset

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return {"messages": [], "n": self.offset + index}


def ns(task):
    return [example["n"] for example in task]


# -----------------------------------------------------------------------------
# common: slicing, mixtures, the multiple-choice prompt

def test_slicing_is_a_view_like_range():
    assert ns(Numbers(10, start=2, stop=9, step=3)) == [2, 5, 8]
    assert ns(Numbers(10, start=7)) == [7, 8, 9]
    assert ns(Numbers(10, stop=50)) == list(range(10))  # a stop past the end clips, like list slicing
    task = Numbers(10, start=1, step=2)
    assert len(task) == 5 and task[-1]["n"] == 9
    with pytest.raises(IndexError):
        task[5]
    with pytest.raises(ValueError):
        Numbers(10, start=5, stop=3)
    with pytest.raises(ValueError):
        Numbers(10, step=0)


def test_mixture_is_nanochats_seeded_shuffle_and_repeats_a_task_listed_twice():
    a, b = Numbers(3), Numbers(5, offset=100)
    mixture = TaskMixture([a, b, a])
    assert len(mixture) == 11
    assert sorted(ns(mixture)) == sorted([0, 1, 2] * 2 + [100, 101, 102, 103, 104])
    # the order nanochat gets: every (task, index) pair in listing order, shuffled by random.Random(42)
    pairs = [(t, i) for t, n in enumerate([3, 5, 3]) for i in range(n)]
    random.Random(42).shuffle(pairs)
    assert ns(mixture) == [[a, b, a][t][i]["n"] for t, i in pairs]
    assert ns(TaskMixture([a, b, a])) == ns(mixture)  # deterministic across builds
    assert ns(TaskMixture([a, b], stop=4)) == ns(TaskMixture([a, b]))[:4]


def test_sequence_concatenates_in_order():
    sequence = TaskSequence([Numbers(2), Numbers(3, offset=10, start=1)])
    assert ns(sequence) == [0, 1, 11, 12]
    assert ns(TaskSequence([Numbers(2), Numbers(3, offset=10)], start=1, step=2)) == [1, 11]


def test_render_mc_puts_the_letter_after_each_choice_without_a_space():
    text = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert text == ("Multiple Choice question: What is 2+2?\n"
                    "- 3=A\n"
                    "- 4=B\n"
                    "- 5=C\n"
                    "\n"
                    "Respond only with the letter of the correct answer.")


# -----------------------------------------------------------------------------
# real data: counts and nanochat's load order

@needs_data
@pytest.mark.parametrize("make, expected", [
    (lambda: ARC("ARC-Easy", "test", TASKS_DIR), 2376),
    (lambda: ARC("ARC-Challenge", "test", TASKS_DIR), 1172),
    (lambda: ARC("ARC-Easy", "validation", TASKS_DIR), 570),
    (lambda: ARC("ARC-Challenge", "validation", TASKS_DIR), 299),
    (lambda: MMLU("all", "test", TASKS_DIR), 14042),
    (lambda: MMLU("all", "validation", TASKS_DIR), 1531),
    (lambda: MMLU("all", "dev", TASKS_DIR), 285),
    (lambda: GSM8K("main", "test", TASKS_DIR), 1319),
    (lambda: GSM8K("main", "train", TASKS_DIR), 7473),
    (lambda: HumanEval(TASKS_DIR), 164),
], ids=["arc_easy_test", "arc_challenge_test", "arc_easy_val", "arc_challenge_val", "mmlu_test", "mmlu_val",
        "mmlu_dev", "gsm8k_test", "gsm8k_train", "humaneval"])
def test_row_counts_match_tasks_md(make, expected):
    assert len(make()) == expected


@needs_data
def test_rows_come_in_the_order_of_default_rng_42():
    """datasets' shuffle(seed=42) is numpy.random.default_rng(42).permutation(n): the same first N
    problems as nanochat's evals (e.g. its 'first 420 of GSM8K test' validation slice)."""
    raw = raw_rows("gsm8k_test")
    perm = np.random.default_rng(42).permutation(len(raw))
    task = GSM8K("main", "test", TASKS_DIR)
    for i in [0, 1, 2, 419, 1318]:
        assert task[i]["messages"][0]["content"] == raw[perm[i]]["question"]
    raw = raw_rows("mmlu_test")
    perm = np.random.default_rng(42).permutation(len(raw))
    task = MMLU("all", "test", TASKS_DIR, start=5000, stop=5200)
    assert [ex["subject"] for ex in task] == [raw[j]["subject"] for j in perm[5000:5200]]


@needs_data
def test_tasks_dir_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_TASKS_DIR", TASKS_DIR)
    assert len(ARC("ARC-Challenge", "test")) == 1172


# -----------------------------------------------------------------------------
# arc.py, mmlu.py: categorical

@needs_data
def test_arc_example_is_its_row_as_multiple_choice():
    raw = raw_rows("arc_easy_test")
    row = raw[np.random.default_rng(42).permutation(len(raw))[0]]
    task = ARC("ARC-Easy", "test", TASKS_DIR)
    example = task[0]
    user, assistant = example["messages"]
    assert example["letters"] == row["choices"]["label"]
    assert user["content"].startswith(f"Multiple Choice question: {row['question']}\n")
    for letter, choice in zip(row["choices"]["label"], row["choices"]["text"]):
        assert f"\n- {choice}={letter}\n" in user["content"]
    assert user["content"].endswith("\n\nRespond only with the letter of the correct answer.")
    assert assistant == {"role": "assistant", "content": row["answerKey"]}
    assert task.eval_type == "categorical"
    assert task.evaluate(example, row["answerKey"]) is True
    assert task.evaluate(example, next(l for l in example["letters"] if l != row["answerKey"])) is False


@needs_data
def test_arc_keeps_three_and_five_choice_questions():
    sizes = {len(ex["letters"]) for ex in ARC("ARC-Challenge", "test", TASKS_DIR)}
    assert 4 in sizes and sizes - {4}, sizes


@needs_data
def test_mmlu_example_answers_with_a_letter_of_abcd():
    raw = raw_rows("mmlu_dev")
    row = raw[np.random.default_rng(42).permutation(len(raw))[3]]
    example = MMLU("all", "dev", TASKS_DIR)[3]
    assert example["letters"] == ("A", "B", "C", "D")
    assert example["subject"] == row["subject"]
    assert example["messages"][0]["content"] == render_mc(row["question"], "ABCD", row["choices"])
    assert example["messages"][1]["content"] == "ABCD"[row["answer"]]


def test_mmlu_rejects_unknown_splits():
    with pytest.raises(ValueError, match="MMLU"):
        MMLU("all", "train")


# -----------------------------------------------------------------------------
# gsm8k.py: calculator marks become tool calls

WENG = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")


def test_gsm8k_solution_splits_at_each_calculator_mark():
    assert solution_parts(WENG) == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]


@needs_data
def test_gsm8k_parts_put_back_together_give_the_original_solution():
    raw = raw_rows("gsm8k_test")
    perm = np.random.default_rng(42).permutation(len(raw))
    for example, j in zip(GSM8K("main", "test", TASKS_DIR), perm):
        parts = example["messages"][1]["content"]
        text = "".join({"text": "{}", "python": "<<{}=", "python_output": "{}>>"}[p["type"]].format(p["text"]) for p in parts)
        assert text == raw[j]["answer"]
        assert parts[-1]["type"] == "text" and re.search(r"#### -?[0-9.,]+$", parts[-1]["text"])


def test_gsm8k_loss_mask_trains_the_tool_call_but_not_its_output():
    tokenizer = Tokenizer([bytes([b]) for b in range(256)])  # bytes only: one token per character here
    conversation = {"messages": [{"role": "user", "content": "Weng?"}, {"role": "assistant", "content": solution_parts(WENG)}]}
    ids, mask = tokenizer.render_conversation(conversation)
    S = tokenizer.special_ids
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m and t < 256])
    assert trained == WENG.replace("<<12/60=0.2>>", "12/60").replace("<<0.2*50=10>>", "0.2*50")
    start = ids.index(S["<|output_start|>"])
    end = ids.index(S["<|output_end|>"])
    assert tokenizer.decode(ids[start + 1:end]) == "0.2" and not any(mask[start:end + 1])
    start = ids.index(S["<|python_start|>"])
    assert tokenizer.decode(ids[start + 1:ids.index(S["<|python_end|>"])]) == "12/60" and mask[start]


def test_gsm8k_evaluate_compares_the_numbers_after_hashes(tmp_path):
    write_jsonl_gz(tmp_path / "gsm8k_test.jsonl.gz", [{"question": "q", "answer": "So 1000 + 234 = <<1000+234=1234>>1234.\n#### 1234"}])
    task = GSM8K("main", "test", tasks_dir=str(tmp_path))
    conversation = task[0]
    assert task.evaluate(conversation, "blah blah\n#### 1234")
    assert task.evaluate(conversation, "#### 1,234")  # thousands commas are dropped
    assert not task.evaluate(conversation, "#### 1235")
    assert not task.evaluate(conversation, "the answer is 1234")  # no '####': wrong
    assert task.reward(conversation, "#### 1234") == 1.0
    assert extract_answer("#### -3.5 dollars") == "-3.5" and extract_answer("none") is None


# -----------------------------------------------------------------------------
# humaneval.py

def test_humaneval_program_is_imports_code_tests_and_check():
    conversation = {"messages": [{"role": "user", "content": "import math\nfrom typing import List\n\n\ndef f(x):\n    \"\"\"from the docs\"\"\"\n"},
                                 {"role": "assistant", "content": "..."}],
                    "entry_point": "f", "test": "def check(candidate):\n    assert candidate(4) == 2.0\n"}
    completion = "Here you go:\n```python\ndef f(x):\n    return math.sqrt(x)\n```\nand another:\n```\nnope\n```"
    assert extract_code(completion) == "def f(x):\n    return math.sqrt(x)"
    assert extract_code("def f(x):\n    return 1\n") == "def f(x):\n    return 1"  # no fence: all of it
    assert extract_imports(conversation["messages"][0]["content"]) == "import math\nfrom typing import List"
    program = HumanEval.program(conversation, completion)
    assert program.startswith("import math\nfrom typing import List\n\ndef f(x):\n    return math.sqrt(x)\n")
    assert "def check(candidate):" in program and program.rstrip().endswith("check(f)")
    namespace = {}
    exec(program, namespace)  # our own trusted snippet: the assertions inside must hold


@needs_data
def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails():
    pytest.importorskip("evals.sandbox", reason="evals/sandbox.py is not written yet")
    task = HumanEval(TASKS_DIR, stop=3)
    assert task.eval_type == "generative"
    for example in task:
        assert example["messages"][1]["content"].startswith(example["messages"][0]["content"])
        assert task.evaluate(example, example["messages"][1]["content"]), example["task_id"]
    wrong = f"```python\ndef {task[0]['entry_point']}(*args):\n    return None\n```"
    assert not task.evaluate(task[0], wrong)


# -----------------------------------------------------------------------------
# spellingbee.py

def test_spellingbee_examples_depend_only_on_their_index():
    train = SpellingBee(size=50)
    assert [train[i] for i in range(10)] == [SpellingBee(size=10)[i] for i in range(10)]
    test = SpellingBee(size=10, split="test")
    assert test[0] != train[0]
    assert test[0] == SpellingBee(size=TEST_SEED_OFFSET + 1)[TEST_SEED_OFFSET]  # test seeds = 10,000,000 + i


def test_spellingbee_answer_counts_are_right():
    task = SpellingBee(size=400)
    assert task.eval_type == "generative"
    for example in task:
        user, assistant = example["messages"]
        text, python, output, final = assistant["content"]
        assert [p["type"] for p in assistant["content"]] == ["text", "python", "python_output", "text"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", python["text"]).groups()
        count = word.count(letter)
        assert word in user["content"] and letter in user["content"]
        assert f"{word}:{','.join(word)}" in text["text"]  # spelled out first
        assert text["text"].count(" hit! count=") == count
        for i, char in enumerate(word, 1):
            assert re.search(rf"^{i}:{char}( hit! count=\d+)?$", text["text"], re.M)
        assert output["text"] == str(count) and final["text"].endswith(f"#### {count}")
        assert task.evaluate(example, f"so #### {count}") and not task.evaluate(example, f"#### {count + 1}")


def test_spellingbee_prompts_vary_in_language_case_quotes_and_question_marks():
    prompts = [ex["messages"][0]["content"] for ex in SpellingBee(size=600)]
    scripts = {"zh/ja": r"[\u4e00-\u9fff]", "ko": r"[\uac00-\ud7af]", "ja kana": r"[\u3040-\u30ff]", "es": "¿|Cuenta|Cuántas",
               "fr": r"Combien|combien|Peux|peux|Dans|dans", "de": r"Wie |wie |Zähl|zähl"}
    for language, pattern in scripts.items():
        assert any(re.search(pattern, p) for p in prompts), language
    assert 200 < sum(p.endswith("?") for p in prompts) < 400
    assert any(p.startswith("how many") for p in prompts) and any(p.startswith("How many") for p in prompts)
    assert any('"' in p for p in prompts) and any("'" in p for p in prompts)


def test_simple_spelling_spells_the_word():
    task = SimpleSpelling(size=20)
    for example in task:
        user, assistant = example["messages"]
        word = user["content"].removeprefix("Spell the word: ")
        assert assistant["content"] == word + ":" + ",".join(word)
    assert task.evaluate(task[0], task[0]["messages"][1]["content"])
    assert task[0]["messages"] != SpellingBee(size=1)[0]["messages"]


def test_word_list_from_a_path_and_from_the_package():
    words = load_words()  # nothing cached: english-words' web2, offline
    assert len(words) > 200_000 and list(words) == sorted(words) and all(re.fullmatch("[a-z]+", w) for w in words[::1000])
    if os.path.exists(WORDS_GZ):
        shared = load_words(WORDS_GZ)
        assert len(shared) == 429_982 and shared[0] < shared[-1]
        assert SpellingBee(size=5, word_list=WORDS_GZ).words is shared


def test_word_list_download_is_cached_and_then_preferred(tmp_path, monkeypatch):
    """dwyl's list, as nanochat downloads it, from a loopback server: CRLF lines, unsorted, one bad line."""
    body = b"zebra\r\napple\r\nit's\r\nmango\r\n"
    with serve({"/words_alpha.txt": body}) as (url, requests):
        monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path))
        path = download_word_list(url + "/words_alpha.txt")
        assert path == str(tmp_path / "words_alpha.txt") and open(path, "rb").read() == body
        assert download_word_list(url + "/words_alpha.txt") == path and len(requests) == 1  # cached: no second request
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert load_words() == ("apple", "mango", "zebra")  # sorted, a-z words only


# -----------------------------------------------------------------------------
# smoltalk.py, customjson.py

SMOLTALK_ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    {"messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]},  # broken: two user turns
]


def test_smoltalk_reads_a_tasks_dir_keeps_the_system_message_and_checks_roles(tmp_path):
    write_jsonl_gz(tmp_path / "smoltalk_train.jsonl.gz", SMOLTALK_ROWS)
    task = SmolTalk("train", tasks_dir=str(tmp_path))
    perm = np.random.default_rng(42).permutation(len(SMOLTALK_ROWS))
    assert len(task) == 4 and task.eval_type is None
    good = [i for i in range(4) if perm[i] != 3]
    for i in good:
        assert task[i] == SMOLTALK_ROWS[perm[i]]
    system = task[good[[perm[i] for i in good].index(1)]]
    assert system["messages"][0]["role"] == "system"
    tokenizer = Tokenizer([bytes([b]) for b in range(256)])
    ids, _ = tokenizer.render_conversation(system)
    assert "Be brief.\n\n2+2?" in tokenizer.decode([t for t in ids if t < 256])  # folded into the first user turn
    with pytest.raises(ValueError, match=r"SmolTalk train example \d: message 1 has role 'user', expected 'assistant'"):
        task[int(np.flatnonzero(perm == 3)[0])]


def test_a_broken_line_in_a_tasks_dir_file_is_reported_with_its_file(tmp_path):
    path = tmp_path / "smoltalk_test.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: non-blank line 1 is not valid JSON")):
        SmolTalk("test", tasks_dir=str(tmp_path))[0]
    path.write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match="not a readable gzip JSON-lines file"):
        SmolTalk("test", tasks_dir=str(tmp_path))


def test_customjson_reads_one_conversation_per_line(tmp_path):
    path = tmp_path / "identity.jsonl"
    lines = [json.dumps(row["messages"]) for row in SMOLTALK_ROWS[:3]]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2] + "\n")  # a blank line is skipped
    task = CustomJSON(str(path))
    assert len(task) == 3 and task[2] == SMOLTALK_ROWS[2]  # file order: no shuffle
    task[0]["messages"].append("mutated")
    assert task[0] == SMOLTALK_ROWS[0]  # every access is a fresh copy


def test_customjson_names_the_file_and_line_of_a_bad_conversation(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SMOLTALK_ROWS[0]["messages"]) + "\n" + '[{"role": "user", "content": "hi"},\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        CustomJSON(str(path))
    path.write_text(json.dumps(SMOLTALK_ROWS[3]["messages"]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: message 1 has role 'user', expected 'assistant'")):
        CustomJSON(str(path))
    with pytest.raises(FileNotFoundError, match="identity_conversations"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------
# where the data comes from: the hub (a loopback stand-in), or a clear error

class serve:
    """A loopback HTTP server for the duration of a with block: serves `files` {path: bytes} on HEAD
    and GET with the headers huggingface_hub reads (commit, etag, size); yields (base url, request log)."""

    def __init__(self, files):
        self.files, self.requests = files, []

    def __enter__(self):
        files, requests = self.files, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def send_head(self):
                requests.append((self.command, self.path))
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                if body is not None:
                    self.send_header("X-Repo-Commit", "c0ffee" + "0" * 34)
                    self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                return body

            def do_HEAD(self):
                self.send_head()

            def do_GET(self):
                body = self.send_head()
                if body:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}", requests

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def parquet_bytes(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def run_python(code, **env):
    """Run code in a fresh interpreter (huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import)."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, **env),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_hub_parquet_is_downloaded_once_then_read_offline(tmp_path):
    gsm8k = [{"question": f"q{i}", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(6)]
    aux = [{"train": {"question": f"aux{i}", "subject": "", "choices": ["w", "x", "y", "z"], "answer": i % 4}} for i in range(5)]
    files = {"/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet": parquet_bytes(gsm8k),
             "/datasets/cais/mmlu/resolve/main/auxiliary_train/train-00000-of-00001.parquet": parquet_bytes(aux)}
    code = ("import json; from nanochat_jax.tasks.gsm8k import GSM8K; from nanochat_jax.tasks.mmlu import MMLU\n"
            "g, m = GSM8K('main', 'test'), MMLU('auxiliary_train', 'train')\n"
            "print(json.dumps([[ex['messages'] for ex in g], [ex['messages'] for ex in m]]))")
    home = str(tmp_path / "home")
    with serve(files) as (url, requests):
        online = json.loads(run_python(code, HF_ENDPOINT=url, NANOCHAT_JAX_HOME=home, HF_HUB_DISABLE_TELEMETRY="1"))
        assert sorted(path for method, path in requests if method == "GET") == sorted(files)
        requests.clear()
        offline = json.loads(run_python(code, HF_ENDPOINT=url, NANOCHAT_JAX_HOME=home, HF_HUB_OFFLINE="1"))
        assert requests == []  # the cache in $NANOCHAT_JAX_HOME/task_data answers by itself
    assert offline == online
    gsm8k_messages, mmlu_messages = online
    perm = np.random.default_rng(42).permutation(6)
    assert [m[0]["content"] for m in gsm8k_messages] == [gsm8k[j]["question"] for j in perm]
    assert gsm8k_messages[0][1]["content"][1] == {"type": "python", "text": f"{perm[0]}+1"}
    perm = np.random.default_rng(42).permutation(5)
    assert [m[1]["content"] for m in mmlu_messages] == ["ABCD"[aux[j]["train"]["answer"]] for j in perm]  # struct unwrapped
    assert os.path.isdir(os.path.join(home, "task_data", "datasets--openai--gsm8k"))


def test_missing_data_error_names_the_task_the_paths_and_both_remedies(tmp_path):
    empty = tmp_path / "tasks"
    empty.mkdir()
    code = ("from nanochat_jax.tasks.arc import ARC; from nanochat_jax.tasks.common import TaskDataError\n"
            f"try: ARC('ARC-Easy', 'test', tasks_dir={str(empty)!r})\n"
            "except TaskDataError as e: print(e)")
    message = run_python(code, NANOCHAT_JAX_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")  # the hub unreachable
    assert message.startswith("ARC ARC-Easy test: no data found")
    assert str(empty / "arc_easy_test.jsonl.gz") in message  # the tasks-dir path tried
    assert "allenai/ai2_arc" in message and "ARC-Easy/test-00000-of-00001.parquet" in message  # the hub file tried
    assert str(tmp_path / "home" / "task_data") in message  # where a download would be cached
    assert "Hugging Face hub" in message and "--tasks-dir DIR" in message and "NANOCHAT_JAX_TASKS_DIR" in message
    assert "Traceback" not in message


def test_missing_data_error_is_a_file_not_found_error():
    assert issubclass(TaskDataError, FileNotFoundError)  # callers may catch either


# -----------------------------------------------------------------------------
# chitchat.py: the chitchat-dataset package's human conversations (offline, always available)

def chitchat_raw():
    """The package's own file: {conversation id: {"messages": [[utterance, ...], ...], ...}}."""
    import chitchat_dataset
    with open(os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json"), encoding="utf-8") as f:
        return json.load(f)


def chitchat_by_id():
    return {example["id"]: example for split in ("train", "test") for example in ChitChat(split)}


def test_chitchat_splits_are_every_20th_sorted_id_and_cover_every_two_sided_conversation():
    raw = chitchat_raw()
    assert len(raw) == 7168
    # usable = two people actually said something (3,150 are one-sided: nobody answered)
    usable = {k for k, v in raw.items() if len({u["sender"] for run in v["messages"] for u in run if u["text"].strip()}) == 2}
    train, test = ChitChat("train"), ChitChat("test")
    train_ids, test_ids = [ex["id"] for ex in train], [ex["id"] for ex in test]
    assert (len(train), len(test)) == (3822, 195) and len(usable) == 4017
    assert set(train_ids).isdisjoint(test_ids) and set(train_ids) | set(test_ids) == usable
    assert test_ids == [k for k in sorted(raw)[::20] if k in usable]  # by position among all ids: fixed per id
    assert train_ids == sorted(train_ids)
    assert train.eval_type is None  # loss data, like SmolTalk


def test_chitchat_examples_alternate_from_user_to_assistant_and_render():
    tokenizer = Tokenizer([bytes([b]) for b in range(256)])
    for split in ("train", "test"):
        for example in ChitChat(split):
            messages = example["messages"]
            assert len(messages) >= 2 and len(messages) % 2 == 0, example["id"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2), example["id"]
            assert all(m["content"] and m["content"] == m["content"].strip() for m in messages), example["id"]
    for example in ChitChat("test"):  # rendering all 4,017 byte by byte takes a while: the test split shows it
        ids, mask = tokenizer.render_conversation(example, max_tokens=10**6)
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m and t < 256])
        assert trained == "".join(m["content"] for m in example["messages"][1::2])  # exactly the assistant's turns


def test_chitchat_turn_is_a_senders_lines_joined_by_newlines():
    raw, examples = chitchat_raw(), chitchat_by_id()
    # the file's first conversation: clean lines, 35 runs that alternate, the first speaker's 18th run is cut
    runs = ["\n".join(u["text"] for u in run) for run in raw["a07edb12-6b91-4138-b11e-02421888d699"]["messages"]]
    messages = examples["a07edb12-6b91-4138-b11e-02421888d699"]["messages"]
    assert len(runs) == 35 and [m["content"] for m in messages] == runs[:34]
    assert messages[:2] == [{"role": "user", "content": "Hello\nHow are you doing today?"},
                            {"role": "assistant", "content": "whats up MD\nim doing good\nhow are you doing?"}]
    # a blank run between two of one sender's runs: they become one turn
    assert [m["content"] for m in examples["6a4c7f41-c279-4f09-b899-aeb0c544edc9"]["messages"]] == [
        "Yes\nIt's murder", "No",
        "If killing a person is murder and a computer is indistinguishable from a person,\nThen turning it off is murder",
        "Depends on what do you consider indistinguishable"]  # then "Whoa we both have animal names", "", "Kewl": a user's last word
    assert examples["d08cd011-3c15-4693-8a27-24a08d61e154"]["messages"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "That would be boring"}]
    # and nowhere do two messages in a row share a role
    assert all(a["role"] != b["role"] for ex in examples.values() for a, b in zip(ex["messages"], ex["messages"][1:]))


def test_chitchat_slices_and_gives_a_fresh_copy_per_access():
    full = [ex["id"] for ex in ChitChat("train")]
    assert [ex["id"] for ex in ChitChat("train", start=10, stop=40, step=7)] == full[10:40:7]
    task = ChitChat("test")
    first = task[0]
    task[0]["messages"].append("mutated")
    task[0]["messages"][0]["content"] = "mutated"
    assert task[0] == first


def test_chitchat_in_pieces_of_k_exchanges_opens_a_new_conversation_first():
    """exchanges=2: every conversation cut into pieces of at most 4 messages, each ending with the assistant,
    which together hold exactly the whole conversations; all opening pieces come first, in conversation order."""
    whole, pieces = ChitChat("test"), ChitChat("test", exchanges=2)
    assert [ex["id"] for ex in pieces][:len(whole)] == [ex["id"] + "#0" for ex in whole]
    assert all(2 <= len(ex["messages"]) <= 4 and ex["messages"][-1]["role"] == "assistant" for ex in pieces)
    joined = {}
    for ex in sorted(pieces, key=lambda ex: int(ex["id"].split("#")[1])):
        joined.setdefault(ex["id"].split("#")[0], []).extend(ex["messages"])
    assert joined == {ex["id"]: ex["messages"] for ex in whole}
    with pytest.raises(ValueError, match="exchanges must be at least 1"):
        ChitChat("test", exchanges=0)


def test_chitchat_rejects_other_splits_and_names_the_missing_package(monkeypatch):
    with pytest.raises(ValueError, match=re.escape("ChitChat split must be train|test, got 'validation'")):
        ChitChat("validation")
    monkeypatch.setitem(sys.modules, "chitchat_dataset", None)  # as if not installed: import raises ImportError
    load_conversations.cache_clear()
    try:
        with pytest.raises(TaskDataError, match=r"'chitchat_dataset' is not installed; pip install chitchat-dataset"):
            ChitChat("train")
    finally:
        load_conversations.cache_clear()  # the next test reads the real package again
