"""
What every task shares: the Task base class (a sliceable list of conversations plus an evaluation
rule), TaskMixture / TaskSequence, the multiple-choice prompt format, and where the data comes from.

A conversation is a dict {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
plus task-specific keys (e.g. "letters" for multiple choice); see tokenizer.render_conversation.

Where a hub-backed task (ARC, MMLU, GSM8K, HumanEval, SmolTalk) finds its rows, first hit wins:
1. a tasks directory, from the task's `tasks_dir=` argument (the pipelines' --tasks-dir) or else
   $NANOCHAT_JAX_TASKS_DIR: gzip JSON lines in the dataset's original field layout, one file per split:
     arc_easy_{train,validation,test}.jsonl.gz   arc_challenge_{train,validation,test}.jsonl.gz
     mmlu_{test,validation,dev,auxiliary_train}.jsonl.gz
     gsm8k_{train,test}.jsonl.gz (socratic: gsm8k_socratic_{train,test}.jsonl.gz)   humaneval.jsonl.gz
     smoltalk_{train,test}.jsonl.gz (one {"messages": [...]} row per line)
2. the Hugging Face hub parquet files nanochat's datasets come from, fetched with huggingface_hub
   into $NANOCHAT_JAX_HOME/task_data (downloaded once, then read from there, also offline).
Either way the rows are then put in nanochat's order: permuted by numpy.random.default_rng(42),
which is what datasets' .shuffle(seed=42) does (nanochat HEAD reads parquet the same way), so
"the first N problems" are the same problems as in nanochat.
"""
import gzip
import json
import os
import random

import numpy as np

from nanochat_jax.common import get_base_dir

TASKS_DIR_ENV = "NANOCHAT_JAX_TASKS_DIR"
SHUFFLE_SEED = 42  # nanochat shuffles every hub dataset with this seed at load time


class Task:
    """A view start:stop:step over a dataset of conversations. Subclasses implement num_examples()
    and get_example(i); evaluating ones set eval_type and implement evaluate()."""

    eval_type = None  # "categorical" (pick one of the answer letters) or "generative" (sample, then check)

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}: need 0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)  # a stop past the end clips, as list slicing does
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index):
        if not isinstance(index, int):
            raise TypeError(f"task indices must be int, got {type(index).__name__}")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {n} examples")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def evaluate(self, conversation, completion):
        """Did `completion` (the assistant text) solve `conversation`? bool (or 0/1)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")


class TaskMixture(Task):
    """All examples of all tasks, shuffled together with random.Random(42) (as nanochat), so every
    stretch of training sees every task. List a task twice to show it twice as often."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The tasks one after the other (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(index)


def render_mc(question, letters, choices):
    """nanochat's multiple-choice prompt. The letter comes after its choice (small models bind it
    better) with no space after '=', so it is the same token as the bare-letter answer."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


def check_messages(messages, where):
    """Raise ValueError (prefixed with `where`) unless messages are an optional system message, then
    user/assistant turns alternating from user (at least one of each), with string contents (an
    assistant's may also be a list of parts)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{where}: messages must be a list of {{'role': ..., 'content': ...}} objects, got {str(messages)[:80]}")
    turns = messages[1:] if messages and messages[0].get("role") == "system" else messages
    if len(turns) < 2:
        raise ValueError(f"{where}: a conversation needs at least a user and an assistant message, got {len(turns)} turn(s)")
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != want:
            raise ValueError(f"{where}: message {i + offset} has role {message.get('role')!r}, expected {want!r} "
                             "(user and assistant must alternate, starting with user, after an optional system message)")
        content = message.get("content")
        if not (isinstance(content, str) or (want == "assistant" and isinstance(content, list))):
            raise ValueError(f"{where}: message {i + offset} content must be a string, got {type(content).__name__}")
    if offset and not isinstance(messages[0].get("content"), str):
        raise ValueError(f"{where}: the system message content must be a string")


# -----------------------------------------------------------------------------
# data access

class TaskDataError(FileNotFoundError):
    """A task's data is neither in the tasks directory nor obtainable from the hub."""


class Rows:
    """The rows of one dataset split in nanochat's order: row i is the source row permutation[i].
    Holds a pyarrow Table (hub parquet) or raw JSON lines, and builds a fresh dict per access."""

    def __init__(self, source, seed=SHUFFLE_SEED, origin="rows"):
        self.source = source  # pyarrow.Table or list[str] of JSON lines
        self.origin = origin  # the file(s) the rows came from, for error messages
        n = len(source) if isinstance(source, list) else source.num_rows
        self.permutation = np.random.default_rng(seed).permutation(n)  # == datasets' .shuffle(seed=seed)

    def __len__(self):
        return len(self.permutation)

    def __getitem__(self, index):
        j = int(self.permutation[index])
        if isinstance(self.source, list):
            try:
                return json.loads(self.source[j])
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.origin}: non-blank line {j + 1} is not valid JSON ({e.msg})") from None
        return self.source.slice(j, 1).to_pylist()[0]


def tasks_dir_or_env(tasks_dir=None):
    return tasks_dir or os.environ.get(TASKS_DIR_ENV) or None


def hub_cache_dir():
    return os.path.join(get_base_dir(), "task_data")


def read_jsonl_gz(path):
    """The non-blank lines of a gzip JSON-lines file (parsed lazily by Rows)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [line for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, truncated, not UTF-8
        raise ValueError(f"{path}: not a readable gzip JSON-lines file ({e})") from None


def hub_download(repo_id, filename):
    """Path of one file of a hub dataset repo, downloaded on first use. huggingface_hub writes to a
    process-unique `.incomplete` file under a per-file lock and renames it into place, so concurrent
    or interrupted downloads never leave a partial file under the real name; cached files are found
    again without the network (HF_HUB_OFFLINE=1 works)."""
    from huggingface_hub import hf_hub_download  # imported here: reading a tasks directory never needs it
    return hf_hub_download(repo_id, filename, repo_type="dataset", cache_dir=hub_cache_dir())


def load_rows(task, local_name, repo_id, hub_files, tasks_dir=None):
    """Rows of one split: `{tasks_dir}/{local_name}.jsonl.gz` if a tasks dir is set and has it, else the
    hub parquet files `hub_files` of `repo_id` (concatenated in order). Raises TaskDataError naming the
    task, the paths tried and both ways to get the data."""
    tasks_dir = tasks_dir_or_env(tasks_dir)
    tried = []
    if tasks_dir:
        path = os.path.join(tasks_dir, f"{local_name}.jsonl.gz")
        if os.path.isfile(path):
            return Rows(read_jsonl_gz(path), origin=path)
        tried.append(f"{path} (not found)")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        paths = [hub_download(repo_id, f) for f in hub_files]
        return Rows(pa.concat_tables([pq.read_table(p) for p in paths]), origin=", ".join(paths))
    except Exception as e:  # no network, offline mode, hub error, broken file: all end in the same advice
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        tried.append(f"hub dataset {repo_id}: {', '.join(hub_files)}, cached in {hub_cache_dir()} "
                     f"({type(e).__name__}: {reason})")
    raise TaskDataError(
        f"{task}: no data found. Tried:\n" + "".join(f"  - {t}\n" for t in tried) +
        "Get it in one of two ways:\n"
        f"  - download it from the Hugging Face hub (https://huggingface.co/datasets/{repo_id}): needs network "
        f"access (and HF_HUB_OFFLINE unset); it is cached under {hub_cache_dir()} for later runs\n"
        f"  - or use a local directory holding {local_name}.jsonl.gz (gzip JSON lines, the dataset's own fields): "
        f"pass --tasks-dir DIR (tasks_dir=DIR) or set {TASKS_DIR_ENV}=DIR") from None
