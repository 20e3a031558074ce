"""
Synthetic spelling tasks (nanochat v1): small models cannot see the letters inside their tokens,
so we over-represent spelling in mid/SFT data.
- SpellingBee: "how many r in strawberry?" in 7 languages; the answer spells the word out, counts
  by hand, double-checks with a python tool call and ends with "#### <count>" (graded like GSM8K).
- SimpleSpelling: "Spell the word: w" -> "w:l,e,t,t,e,r,s", just the hard part.
Example i is drawn by random.Random(i) (test: 10,000,000 + i), so any size gives the same first examples.

Word list, first hit wins: an explicit path (.txt or .txt.gz, one word per line); dwyl's words_alpha.txt
(~370K words, nanochat's list) if download_word_list() has cached it in $NANOCHAT_JAX_HOME; else the
offline list of the `english-words` package (web2, lowercase). Words are kept if a-z only, then sorted.

python -m nanochat_jax.tasks.spellingbee              # preview a few examples
python -m nanochat_jax.tasks.spellingbee --download   # cache dwyl's word list first
"""
import argparse
import fcntl
import functools
import gzip
import os
import random
import re
import shutil
import urllib.request

from nanochat_jax.common import get_base_dir
from nanochat_jax.tasks.common import Task
from nanochat_jax.tasks.gsm8k import assistant_text, extract_answer

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
TEST_SEED_OFFSET = 10_000_000  # above any train index, so train and test never share a seed
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_RE = re.compile(r"[a-z]+")  # the python tool call quotes the word, so nothing else may appear in it

# Our own prompt wording. No template ends in "?": half the prompts get one appended (Spanish opens with
# "¿" and is closed by that same "?" or left open, as people type). 51 in all.
USER_TEMPLATES = [
    # English
    "How many times does the letter {letter} occur in {word}",
    "How many {letter}'s does the word {word} have",
    "Count the letter {letter} in the word {word}",
    "How often does {letter} show up in {word}",
    "In {word}, how many times do you see {letter}",
    "What is the number of {letter} letters in {word}",
    "Please count the {letter} characters in {word}",
    "How many copies of {letter} are there in {word}",
    "Tell me how many times {letter} appears in the word {word}",
    "Could you count how many {letter} the word {word} contains",
    "Letter count: how many {letter} in {word}",
    "Quick question: how many {letter} does {word} have",
    "I need the number of {letter} in {word}",
    "Check how many times {letter} is in {word}",
    "How many instances of the letter {letter} does {word} contain",
    "Looking at the word {word}, how many {letter} can you find",
    "Spell out {word} and count the {letter}",
    "Determine how many {letter} are in the word {word}",
    "Find how many times the character {letter} occurs in {word}",
    "What's the {letter} count in {word}",
    "How many {letter} letters appear in {word}",
    "Count every {letter} in {word}",
    "The word {word}: how many {letter} does it have",
    "How many times can you find {letter} in {word}",
    "Give me the number of times {letter} occurs in {word}",
    "How many occurrences of {letter} does the word {word} have",
    "If you spell {word}, how many {letter} do you write",
    # Spanish
    "¿Cuántas veces aparece la letra {letter} en la palabra {word}",
    "¿Cuántas {letter} tiene la palabra {word}",
    "Cuenta cuántas veces sale la {letter} en {word}",
    "¿Cuál es el número de letras {letter} en {word}",
    # Chinese
    "{word}这个单词里有几个字母{letter}",
    "数数{word}里面有多少个{letter}",
    "字母{letter}在{word}中出现了几次",
    "请问{word}包含多少个{letter}",
    # Korean
    "{word}에는 {letter}가 몇 개 들어 있나요",
    "{word} 단어에서 {letter}는 몇 번 나오나요",
    "{word}에 있는 {letter}의 개수를 세어 주세요",
    "{letter}가 {word}에 몇 번 있나요",
    # French
    "Combien y a-t-il de {letter} dans le mot {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Peux-tu compter les {letter} dans {word}",
    "Dans {word}, combien de {letter} vois-tu",
    # German
    "Wie oft steht der Buchstabe {letter} im Wort {word}",
    "Wie viele {letter} enthält {word}",
    "Zähl bitte die {letter} in {word}",
    "Wie viele Male kommt {letter} im Wort {word} vor",
    # Japanese
    "{word}という単語に{letter}はいくつありますか",
    "{word}の中に{letter}は何回出てきますか",
    "{word}に含まれる{letter}の数を数えてください",
    "{letter}は{word}に何個ありますか",
]


def cached_word_list_path():
    return os.path.join(get_base_dir(), "words_alpha.txt")


def download_word_list(url=WORD_LIST_URL, timeout=60):
    """Fetch dwyl's words_alpha.txt once into $NANOCHAT_JAX_HOME: a lock so concurrent processes download
    it once, a .tmp file renamed into place so a crash never leaves a truncated list. Returns the path."""
    path = cached_word_list_path()
    if os.path.exists(path):
        return path
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.exists(path):  # someone else finished it while we waited
            return path
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            with open(tmp, encoding="utf-8") as f:
                if not any(WORD_RE.fullmatch(line.strip()) for line in f):
                    raise ValueError(f"{url} returned no words")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


@functools.lru_cache(maxsize=4)  # the spelling tasks of one mixture share the (large) list
def _load_words(path):
    if path is None:
        from english_words import get_english_words_set
        words = get_english_words_set(["web2"], lower=True, alpha=True)
    else:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            words = [line.strip() for line in f]  # strip() also drops the \r of dwyl's CRLF lines
    words = tuple(sorted(w for w in words if WORD_RE.fullmatch(w)))  # sorted: a seed means the same word everywhere
    if not words:
        raise ValueError(f"word list {path or 'english-words web2'} has no a-z words")
    return words


def load_words(path=None):
    """The word list (a sorted tuple): `path`, else the cached dwyl download, else english-words."""
    if path is None and os.path.exists(cached_word_list_path()):
        path = cached_word_list_path()
    return _load_words(None if path is None else os.path.abspath(path))


def spelled(word):
    return f"{word}:{','.join(word)}"


class SpellingBee(Task):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", word_list=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SpellingBee split must be train|test, got {split!r}")
        self.size, self.split = size, split
        self.words = load_words(word_list)

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # 10%: often a letter it lacks
        count = word.count(letter)

        template = rng.choice(USER_TEMPLATES)
        if rng.random() < 0.3:  # people skip the shift key
            template = template.lower()
        letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        prompt = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            prompt += "?"

        # by hand first, one numbered line per letter; "3:r" with no space, so "r" is the same token as in the question
        lines, hits = [], 0
        for i, char in enumerate(word, 1):
            if char == letter:
                hits += 1
                lines.append(f"{i}:{char} hit! count={hits}")
            else:
                lines.append(f"{i}:{char}")
        by_hand = (f"I'll spell '{word}' letter by letter and count the '{letter}' as I go.\n\n"
                   f"{spelled(word)}\n\n" + "\n".join(lines) + f"\n\nBy hand that makes {hits}.\n\n"
                   "Let me check it with Python:\n\n")
        parts = [
            {"type": "text", "text": by_hand},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython also says {count}.\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, completion):
        """Exact match of the '####' counts, as GSM8K."""
        predicted = extract_answer(completion)
        return predicted is not None and predicted == extract_answer(assistant_text(conversation))

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))


class SimpleSpelling(Task):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", word_list=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SimpleSpelling split must be train|test, got {split!r}")
        self.size, self.split = size, split
        words = list(load_words(word_list))
        random.Random(42).shuffle(words)  # a different word per seed than SpellingBee's
        self.words = words

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        word = rng.choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": spelled(word)},
        ]}

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="preview SpellingBee examples")
    parser.add_argument("--download", action="store_true", help=f"first cache {WORD_LIST_URL} in $NANOCHAT_JAX_HOME")
    parser.add_argument("--word-list", default=None, help="a word list file (.txt or .txt.gz), one word per line")
    parser.add_argument("-n", type=int, default=4, help="examples to print")
    args = parser.parse_args()
    if args.download:
        print(f"word list at {download_word_list()}")
    task = SpellingBee(size=args.n, word_list=args.word_list)
    print(f"{len(task.words):,} words")
    for example in task:
        user, assistant = example["messages"]
        print("=" * 80 + "\n" + user["content"] + "\n" + "-" * 80)
        print("".join(f"<<{p['text']}=" if p["type"] == "python" else f"{p['text']}>>" if p["type"] == "python_output" else p["text"]
                      for p in assistant["content"]))
