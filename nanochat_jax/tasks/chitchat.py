"""
ChitChat, human small talk: the Chit-Chat Challenge dataset of BYU's PCC lab (2018), shipped whole as
one JSON file inside the PyPI package `chitchat-dataset` (MIT licence), so it works offline: the
stand-in for SmolTalk when no hub data is available. No evaluation: training and validation-loss data.

The file maps a conversation id (a UUID) to {"messages": [[utterance, ...], ...], "prompt", "start",
"ratings"}: each inner list is one sender's run of chat lines, an utterance {"text", "sender",
"timestamp"}. Of its 7,168 conversations 3,150 are one-sided (the partner never answered) and one
more is once blanks are dropped: 4,017 usable (3,822 train, 195 test). The prompt the pair was given
to talk about is not part of what they said, so it is left out. The text is plain ASCII English.

Into nanochat's format: utterances are stripped and empty ones dropped; consecutive lines of one
sender become one turn, joined by newlines (they were separate chat lines, often unpunctuated); the
first speaker is "user", the other "assistant"; a trailing user turn is dropped, so every example
ends with an answer; conversations left with no user+assistant exchange are skipped.
Split: conversation ids sorted, every 20th (position 0, 20, 40, ...) is test, the rest train. The
position is taken over all ids, usable or not, so a conversation's split depends on its id alone.

exchanges=k cuts each conversation into pieces of k user+assistant exchanges (the last may be shorter),
ordered all first pieces, then all second pieces, and so on: the first N rows open N different
conversations. Half of them run past 256 tokens whole, so at a small model's context an SFT row would
lose its ending; as pieces, every row fits and ends with an answer and <|assistant_end|>.
"""
import functools
import importlib.resources
import itertools
import json

from nanochat_jax.tasks.common import Task, TaskDataError, check_messages

PACKAGE = "chitchat_dataset"
TEST_EVERY = 20  # 1 in 20 conversations for the validation loss (~200), the rest to train
SPLITS = ("train", "test")


def to_messages(conversation):
    """One raw conversation {"messages": [[{"text", "sender", ...}, ...], ...]} as nanochat messages
    (a list, possibly too short to use: the caller checks)."""
    lines = [(u["sender"], u["text"].strip()) for run in conversation["messages"] for u in run]
    lines = [(sender, text) for sender, text in lines if text]  # 33 utterances are blank
    # grouped by sender over the flat list, not the package's runs: dropping a blank run can leave
    # two runs of the same sender side by side, and they are one turn
    turns = [(sender, "\n".join(text for _, text in group)) for sender, group in itertools.groupby(lines, key=lambda line: line[0])]
    if turns and len(turns) % 2:
        turns.pop()  # the first speaker had the last word: end on the assistant
    first = turns[0][0] if turns else None
    return [{"role": "user" if sender == first else "assistant", "content": text} for sender, text in turns]


@functools.lru_cache(maxsize=1)  # both splits (and every task of a mixture) share one parse of the 40 MB file
def load_conversations():
    """((split, id, messages as a tuple of (role, content)), ...) for every usable conversation, in
    sorted id order."""
    try:
        import chitchat_dataset
    except ImportError:
        raise TaskDataError(f"ChitChat: the Python package {PACKAGE!r} is not installed; pip install chitchat-dataset "
                            "(it carries the whole dataset, 7,168 conversations, MIT licence)") from None
    path = importlib.resources.files(chitchat_dataset) / "dataset.json"
    try:
        # read directly, not via chitchat_dataset.Dataset: that opens the file in the locale's encoding
        with path.open("r", encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise TaskDataError(f"ChitChat: cannot read {path} of the {PACKAGE!r} package ({type(e).__name__}: {e}); "
                            "reinstall it: pip install --force-reinstall chitchat-dataset") from None
    rows = []
    for position, conversation_id in enumerate(sorted(raw)):  # sorted: the file's own order is not an API
        messages = to_messages(raw[conversation_id])
        if len(messages) < 2:
            continue  # one-sided: nobody answered
        check_messages(messages, f"ChitChat conversation {conversation_id}")
        split = "test" if position % TEST_EVERY == 0 else "train"
        rows.append((split, conversation_id, tuple((m["role"], m["content"]) for m in messages)))
    return tuple(rows)


class ChitChat(Task):

    def __init__(self, split="train", exchanges=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"ChitChat split must be train|test, got {split!r}")
        if exchanges is not None and exchanges < 1:
            raise ValueError(f"ChitChat exchanges must be at least 1, got {exchanges}")
        self.split = split
        self.rows = [row for row in load_conversations() if row[0] == split]
        if exchanges:
            n = 2 * exchanges  # messages per piece
            pieces = [(j, position, (f"{cid}#{j}", messages[n * j:n * (j + 1)]))
                      for position, (_, cid, messages) in enumerate(self.rows) for j in range((len(messages) + n - 1) // n)]
            self.rows = [(split, cid, messages) for _, _, (cid, messages) in sorted(pieces, key=lambda piece: piece[:2])]

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        _, conversation_id, messages = self.rows[index]
        # fresh dicts per access (the cache holds tuples), so a caller may edit what it gets
        return {"messages": [{"role": role, "content": content} for role, content in messages], "id": conversation_id}
