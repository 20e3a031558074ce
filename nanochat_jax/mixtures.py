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
import math
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
# the spelling tasks' sizes, as nanochat (mid: 200K + 80K; SFT: 300 + 300), beside SmolTalk's rows in that stage
# (mid: its ~460K train rows; SFT: the first 10K)
SPELLING = {"mid": (200_000, 80_000), "sft": (300, 300)}
SMOLTALK_ROWS = {"mid": 460_000, "sft": 10_000}
# Offline, chitchat stands in for SmolTalk, and the spelling tasks keep their share of its text. A SmolTalk row is
# ~750 tokens (nanochat's ~750 mid steps of 524,288 tokens over 848K rows, most of them SmolTalk); a chitchat piece
# ~95 (the tiny tier's tokenizer; fewer with a larger vocabulary): so one SmolTalk row counts as about 8 pieces.
# Sized by rows instead, SpellingBee would be a third of the offline tokens, and a small model answers every
# question with its letter-by-letter template, never stopping.
SMOLTALK_ROW_IN_CHITCHAT_PIECES = 8
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
    parser.add_argument("--mixture-fraction", type=float, default=1.0, help="keep the first fraction of every source but the identity set (small runs)")


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
        spelling = SPELLING[stage]
        if source == "offline":  # chitchat stands in for SmolTalk: spelling keeps nanochat's share of it
            chitchat = ChitChat("train", exchanges=CHITCHAT_EXCHANGES, stop=SMOLTALK_ROWS[stage])
            share = min(1.0, len(chitchat) / (SMOLTALK_ROW_IN_CHITCHAT_PIECES * SMOLTALK_ROWS[stage]))
            spelling = [round(n * share) for n in spelling]
        parts += [("identity conversations", identity())] * IDENTITY_COPIES[stage]
        parts += [("SimpleSpelling", SimpleSpelling(size=spelling[0], split="train", word_list=word_list)),
                  ("SpellingBee", SpellingBee(size=spelling[1], split="train", word_list=word_list))]
        if source == "offline":
            parts.append(("chitchat train", chitchat))
    elif source == "offline":
        parts.append(("chitchat test", ChitChat("test", exchanges=CHITCHAT_EXCHANGES)))
    return parts


def mixture(stage, split, source="auto", tasks_dir=None, word_list=None, fraction=1.0, log=print):
    """The `stage` ('mid' | 'sft') mixture of `split` ('train' | 'val') from `source` (see the docstring).
    fraction < 1 keeps the first rows of every train source but the identity conversations (a few hundred, and the
    point of a small chat model), in proportion, so the mixture's shares stay: the tiny tier's small subsets. Val
    mixtures stay whole: the evals read only as far as their token or batch counts."""
    if (stage, split) not in HUB or source not in SOURCES:
        raise ValueError(f"no mixture for stage={stage!r} split={split!r} source={source!r}: "
                         f"stage mid|sft, split train|val, source {'|'.join(SOURCES)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"mixture fraction {fraction} is not in (0, 1]")
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
    if fraction < 1 and split == "train":
        for name, task in parts:  # Task views: a new stop keeps their own start/step
            if name != "identity conversations":
                task.stop = task.start + math.ceil(fraction * len(task)) * task.step
    return Mixture(TaskMixture([task for _, task in parts]), [(name, len(task)) for name, task in parts], kind)
