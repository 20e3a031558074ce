"""
Conversations from a JSON-lines file of your own: each line is one conversation, a JSON array of
messages [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...].
nanochat mixes its identity conversations (who the model is) in this way; get that file with
  curl -L -o $NANOCHAT_JAX_HOME/identity_conversations.jsonl https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl
A .gz file is read through gzip. Every line is checked when the file is loaded.
"""
import gzip
import json
import os

from nanochat_jax.tasks.common import Task, check_messages


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        if not os.path.isfile(filepath):
            raise FileNotFoundError(f"CustomJSON: {filepath} does not exist (one JSON array of messages per line; "
                                    "nanochat's identity conversations: https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl)")
        self.conversations = []
        with (gzip.open if filepath.endswith(".gz") else open)(filepath, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{filepath}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                check_messages(messages, f"{filepath}:{lineno}")
                self.conversations.append(line)  # kept as text: every access gets its own copy

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": json.loads(self.conversations[index])}
