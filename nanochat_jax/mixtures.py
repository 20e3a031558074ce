"""
The conversation mixtures of midtraining and SFT, from two kinds of source:
  nanochat  nanochat v1's mixtures (spec §4.3, §4.4): the hub datasets (SmolTalk, MMLU, GSM8K, ARC, via
            the task library), our identity conversations and the spelling tasks on dwyl's word list
  offline   what a machine without the hub can have: the identity conversations, the spelling tasks on
            the registry word list (english-words), chitchat-dataset's human conversations as the
            stand-in for SmolTalk, plus whichever of nanochat's hub splits a --tasks-dir holds
  auto      nanochat if every one of its sources loads, else offline (saying what was missing)

    mix = mixture("mid", "train", source="auto", tasks_dir=None)
    mix.task       # a TaskMixture (shuffled with random.Random(42), as nanochat)
    mix.sources    # [(name, rows), ...] for the report card
"""
import os
from dataclasses import dataclass

from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.chitchat import ChitChat
from nanochat_jax.tasks.common import TaskDataError, TaskMixture, tasks_dir_or_env
from nanochat_jax.tasks.customjson import CustomJSON
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.spellingbee import WORD_LIST_URL, SimpleSpelling, SpellingBee, cached_word_list_path, download_word_list

IDENTITY_PATH = os.path.join(os.path.dirname(__file__), "tasks", "identity_conversations.jsonl")
SOURCES = ("auto", "nanochat", "offline")

# nanochat's hub splits per (stage, split): (name in the report, the tasks-dir file, how to build it).
# The file name lets the offline mixture take exactly the splits a --tasks-dir provides.
HUB = {
    ("mid", "train"): [
        ("SmolTalk train", "smoltalk_train", lambda d: SmolTalk("train", tasks_dir=d)),
        ("MMLU auxiliary_train", "mmlu_auxiliary_train", lambda d: MMLU("auxiliary_train", "train", tasks_dir=d)),
        ("GSM8K train", "gsm8k_train", lambda d: GSM8K("main", "train", tasks_dir=d)),
    ],
    ("mid", "val"): [
        ("SmolTalk test", "smoltalk_test", lambda d: SmolTalk("test", tasks_dir=d)),
        ("MMLU test[:5200]", "mmlu_test", lambda d: MMLU("all", "test", tasks_dir=d, stop=5200)),
        ("GSM8K test[:420]", "gsm8k_test", lambda d: GSM8K("main", "test", tasks_dir=d, stop=420)),
    ],
    ("sft", "train"): [
        ("ARC-Easy train", "arc_easy_train", lambda d: ARC("ARC-Easy", "train", tasks_dir=d)),
        ("ARC-Challenge train", "arc_challenge_train", lambda d: ARC("ARC-Challenge", "train", tasks_dir=d)),
        ("GSM8K train", "gsm8k_train", lambda d: GSM8K("main", "train", tasks_dir=d)),
        ("SmolTalk train[:10K]", "smoltalk_train", lambda d: SmolTalk("train", tasks_dir=d, stop=10_000)),
    ],
    ("sft", "val"): [
        ("SmolTalk test", "smoltalk_test", lambda d: SmolTalk("test", tasks_dir=d)),
    ],
}
# the spelling tasks' sizes, as nanochat (mid: 200K + 80K; SFT: 300 + 300)
SPELLING = {"mid": (200_000, 80_000), "sft": (300, 300)}
CHITCHAT_EXCHANGES = 2  # chitchat in pieces of two exchanges: every row fits a small context and ends with an answer
IDENTITY_COPIES = {"mid": 2, "sft": 1}  # midtraining lists the identity set twice: shown twice as often


@dataclass
class Mixture:
    task: TaskMixture
    sources: list  # [(name, rows)]
    kind: str  # "nanochat" or "offline"

    def describe(self):
        return f"{self.kind}: " + ", ".join(f"{name} {rows:,}" for name, rows in self.sources) + f" ({len(self.task):,} rows)"


def add_mixture_flags(parser):
    """Where a stage's mixture comes from: the flags mid_train and chat_sft share."""
    parser.add_argument("--mixture", type=str, default="auto", choices=SOURCES, help="nanochat's hub mixture, the offline one, or auto")
    parser.add_argument("--tasks-dir", type=str, default=None, help="local task data (gzip JSON lines) instead of the hub")
    parser.add_argument("--word-list", type=str, default=None, help="the spelling tasks' word list (default: dwyl's; offline: english-words)")
    parser.add_argument("--max-rows-per-source", type=int, default=None, help="cap every source but the identity set (small runs)")


def identity():
    """Our identity conversations (shipped in the package): what nanochat_jax is, who made it, what it can do."""
    return CustomJSON(IDENTITY_PATH)


def nanochat_word_list():
    """dwyl's words_alpha.txt, as nanochat's spelling tasks use: cached, else downloaded."""
    if os.path.exists(cached_word_list_path()):
        return cached_word_list_path()
    try:
        return download_word_list()
    except (OSError, ValueError) as e:
        raise TaskDataError(f"the spelling tasks' word list: cannot download {WORD_LIST_URL} ({e}); pass --word-list PATH "
                            "(one word per line), or --mixture offline for the registry word list") from None


def in_tasks_dir(local_name, tasks_dir=None):
    """Does the tasks directory (--tasks-dir, else $NANOCHAT_JAX_TASKS_DIR) hold this split? Offline runs ask before
    building a hub task, so they never reach for the network."""
    tasks_dir = tasks_dir_or_env(tasks_dir)
    return bool(tasks_dir) and os.path.isfile(os.path.join(tasks_dir, f"{local_name}.jsonl.gz"))


def _local_parts(stage, split, source, tasks_dir, word_list):
    """The non-hub sources: identity, spelling and (offline) chitchat, as [(name, task)]."""
    parts = []
    if split == "train":
        n_simple, n_bee = SPELLING[stage]
        parts += [("identity conversations", identity())] * IDENTITY_COPIES[stage]
        parts += [("SimpleSpelling", SimpleSpelling(size=n_simple, split="train", word_list=word_list)),
                  ("SpellingBee", SpellingBee(size=n_bee, split="train", word_list=word_list))]
        if source == "offline":
            parts.append(("chitchat train", ChitChat("train", exchanges=CHITCHAT_EXCHANGES)))
    elif source == "offline":
        parts.append(("chitchat test", ChitChat("test", exchanges=CHITCHAT_EXCHANGES)))
    return parts


def mixture(stage, split, source="auto", tasks_dir=None, word_list=None, max_rows_per_source=None, log=print):
    """The `stage` ('mid' | 'sft') mixture of `split` ('train' | 'val') from `source` (see the docstring).
    max_rows_per_source caps every source but the identity conversations (a few hundred, and the point of a small
    chat model) at its first N rows: the tiny tier's small subsets."""
    if (stage, split) not in HUB or source not in SOURCES:
        raise ValueError(f"no mixture for stage={stage!r} split={split!r} source={source!r}: "
                         f"stage mid|sft, split train|val, source {'|'.join(SOURCES)}")
    tasks_dir = tasks_dir_or_env(tasks_dir)
    kind, hub_parts = source, []
    if source in ("auto", "nanochat"):
        try:
            hub_parts = [(name, build(tasks_dir)) for name, _, build in HUB[stage, split]]
            if word_list is None and split == "train":
                word_list = nanochat_word_list()
            kind = "nanochat"
        except TaskDataError as e:
            if source == "nanochat":
                raise
            log(f"{stage} {split} mixture: nanochat's sources are not all available, using the offline mixture. "
                f"Missing: {str(e).splitlines()[0]}")
            kind, word_list = "offline", None
    if kind == "offline":  # the hub splits a tasks directory holds, and nothing from the network
        hub_parts = [(name, build(tasks_dir)) for name, local_name, build in HUB[stage, split] if in_tasks_dir(local_name, tasks_dir)]
    parts = hub_parts + _local_parts(stage, split, kind, tasks_dir, word_list)
    if max_rows_per_source is not None:
        for name, task in parts:  # Task views: narrowing stop keeps their own start/step
            if name == "identity conversations":
                continue
            task.stop = min(task.stop if task.stop is not None else max_rows_per_source, max_rows_per_source)
    return Mixture(TaskMixture([task for _, task in parts]), [(name, len(task)) for name, task in parts], kind)
