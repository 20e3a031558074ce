"""
BPE tokenizer: trained by our Rust crate (nanochat_jax.rust_bpe), run at inference by tiktoken.
- byte-level BPE with the GPT-4 split pattern, except digits are grouped 1-2 (not 1-3)
- 9 special tokens get the ids right after the mergeable ranks, so <|bos|> == len(ranks)
- saved as plain files (no pickle): ranks.tiktoken (base64 bytes + rank per line), tokenizer.json, token_bytes.npy
- render_conversation turns a chat into (ids, loss mask) for midtraining / SFT / RL
"""
import base64
import binascii
import codecs
import copy
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import tiktoken

from nanochat_jax.common import get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with this
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, written back into the stream
]

# GPT-4 (cl100k) split pattern but numbers are split into chunks of 1-2 digits, which was slightly
# better than 1-3 at small vocab sizes in nanochat's ablation
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

RANKS_FILE = "ranks.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"


def _check_utf8(text):
    # tiktoken would silently swap lone surrogates for U+FFFD; we would rather hear about bad data
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text cannot be encoded as UTF-8 (lone surrogate at index {e.start}): {text[max(0, e.start - 20):e.start + 20]!r}") from None


def _replace_dir(tmp_dir, path):
    """Move a fully written tmp_dir to path. An existing tokenizer is swapped out only after the new
    one is complete, so a crash leaves either the old files or the new ones, never a mix."""
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "tokenizer"))
    os.rename(tmp_dir, path)
    if old:
        shutil.rmtree(old)


class Tokenizer:
    """tiktoken Encoding built from (token bytes in rank order, split pattern) plus our special tokens."""

    def __init__(self, ranks, pattern=SPLIT_PATTERN):
        self.ranks = list(ranks)  # ranks[i] = bytes of the token with id i
        self.pattern = pattern
        self.special_ids = {name: len(self.ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanochat_jax",
            pat_str=pattern,
            mergeable_ranks={b: i for i, b in enumerate(self.ranks)},
            special_tokens=self.special_ids,
        )
        self.bos_token_id = self.special_ids["<|bos|>"]
        # byte length of every token from its raw bytes; a str round trip would count a lone 0x80+ byte as 3 (nanochat #693)
        self.token_bytes = np.zeros(self.enc.n_vocab, dtype=np.int32)  # specials stay 0: they carry no text
        self.token_bytes[:len(self.ranks)] = [len(b) for b in self.ranks]

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=SPLIT_PATTERN):
        """Train BPE with the Rust crate; vocab_size counts the 256 bytes and the special tokens."""
        from nanochat_jax import rust_bpe  # imported here so inference never needs the compiled crate
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
        bpe = rust_bpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, num_ranks, pattern=pattern)
        pairs = sorted(bpe.get_mergeable_ranks(), key=lambda br: br[1])
        assert [r for _, r in pairs] == list(range(len(pairs))), "rust_bpe returned non-contiguous ranks"
        return cls([bytes(b) for b, _ in pairs], bpe.get_pattern())

    @classmethod
    def placeholder(cls, vocab_size):
        """For weights that come without their tokenizer (golden files, benchmarks): the 9 specials take the
        last 9 ids of vocab_size, and byte pairs stand in for the unknown merges."""
        pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
        return cls([bytes([b]) for b in range(256)] + pairs[:vocab_size - len(SPECIAL_TOKENS) - 256])

    # -----------------------------------------------------------------------------
    # save / load: plain text + JSON + npy, validated on load

    def save(self, path):
        path = os.path.abspath(path)
        ranks_text = "".join(f"{base64.b64encode(b).decode('ascii')} {i}\n" for i, b in enumerate(self.ranks)).encode("ascii")
        meta = {
            "pattern": self.pattern,
            "special_tokens": SPECIAL_TOKENS,
            "num_ranks": len(self.ranks),
            "ranks_sha256": hashlib.sha256(ranks_text).hexdigest(),  # lets a load detect a tampered or truncated file
        }
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=os.path.dirname(path))
        with open(os.path.join(tmp, RANKS_FILE), "wb") as f:
            f.write(ranks_text)
        np.save(os.path.join(tmp, TOKEN_BYTES_FILE), self.token_bytes)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, path)
        print(f"saved tokenizer ({self.get_vocab_size()} tokens) to {path}")

    @classmethod
    def from_directory(cls, path):
        """Load a tokenizer saved by .save(); raises ValueError naming the file if anything is off."""
        meta_path, ranks_path, tb_path = (os.path.join(path, f) for f in (META_FILE, RANKS_FILE, TOKEN_BYTES_FILE))
        for p in (meta_path, ranks_path, tb_path):
            if not os.path.isfile(p):
                raise ValueError(f"{p}: missing file (tokenizer directory is incomplete)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
        expected = {"pattern": str, "special_tokens": list, "num_ranks": int, "ranks_sha256": str}
        for key, typ in expected.items():
            if not isinstance(meta, dict) or not isinstance(meta.get(key), typ):
                raise ValueError(f"{meta_path}: missing or malformed field {key!r} (expected {typ.__name__})")
        if meta["special_tokens"] != SPECIAL_TOKENS:
            raise ValueError(f"{meta_path}: special_tokens {meta['special_tokens']} differ from this code's {SPECIAL_TOKENS}")

        with open(ranks_path, "rb") as f:
            ranks_text = f.read()
        sha = hashlib.sha256(ranks_text).hexdigest()
        if sha != meta["ranks_sha256"]:
            raise ValueError(f"{ranks_path}: sha256 mismatch (file has {sha}, {META_FILE} expects {meta['ranks_sha256']}); the file was modified or truncated")
        ranks = []
        for n, line in enumerate(ranks_text.splitlines(), start=1):
            parts = line.split()
            token = None
            if len(parts) == 2 and parts[1].isdigit():
                try:
                    token = base64.b64decode(parts[0], validate=True)
                except binascii.Error:
                    pass
            if not token:
                raise ValueError(f"{ranks_path}: bad line {n}: {line[:80]!r} (expected '<base64 bytes> <rank>')")
            rank = int(parts[1])
            if rank != n - 1:
                raise ValueError(f"{ranks_path}: ranks are not 0..n-1 in order (line {n} has rank {rank})")
            if rank < 256 and token != bytes([rank]):
                raise ValueError(f"{ranks_path}: the first 256 ranks must be the single bytes, line {n} is {token!r}")
            ranks.append(token)
        if len(ranks) != meta["num_ranks"]:
            raise ValueError(f"{ranks_path}: has {len(ranks)} ranks, {META_FILE} says num_ranks={meta['num_ranks']}")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"{ranks_path}: duplicate token bytes")
        try:
            tok = cls(ranks, meta["pattern"])
        except Exception as e:
            raise ValueError(f"{meta_path}: could not build the encoding (bad pattern?): {e}") from None

        # token_bytes.npy is read directly by bpb evals, so a stale copy must not go unnoticed
        try:
            saved_tb = np.load(tb_path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{tb_path}: unreadable ({e})") from None
        if saved_tb.shape != tok.token_bytes.shape or not np.array_equal(saved_tb, tok.token_bytes):
            raise ValueError(f"{tb_path}: does not match the byte lengths of the tokens in {RANKS_FILE}")
        return tok

    # -----------------------------------------------------------------------------
    # basic queries

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return list(SPECIAL_TOKENS)

    def get_pattern(self):
        return self.pattern

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode_special(self, name):
        if name not in self.special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self.special_ids[name]

    def id_to_token(self, id):
        return self.enc.decode_single_token_bytes(id).decode("utf-8", errors="replace")

    # -----------------------------------------------------------------------------
    # encode / decode

    def _to_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int], list[str] -> list[list[int]]; special-token strings in the text stay ordinary text."""
        pre = [] if prepend is None else [self._to_id(prepend)]
        post = [] if append is None else [self._to_id(append)]
        if isinstance(text, str):
            _check_utf8(text)
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, list):
            for t in text:
                _check_utf8(t)
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [pre + ids + post for ids in batch] if pre or post else batch
        raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_batch(self, list_of_ids, num_threads=8):
        return self.enc.decode_batch(list_of_ids, num_threads=num_threads)

    # -----------------------------------------------------------------------------
    # chat rendering

    def render_conversation(self, conversation, max_tokens=2048):
        """Render {"messages": [...]} to (ids, mask); mask is 1 on the tokens the assistant is trained to produce."""
        ids, mask = [], []
        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            # there is no system token: fold the system prompt into the first user turn
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            if not isinstance(messages[0]["content"], str) or not isinstance(messages[1]["content"], str):
                raise ValueError("system and first user message content must be strings")
            merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            messages = [merged] + messages[2:]  # a new list: never mutate the caller's conversation
        if not messages:
            raise ValueError("conversation has no messages")

        S = self.special_ids
        add(S["<|bos|>"], 0)
        for i, message in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if message["role"] != want:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {want!r} (roles must alternate user/assistant, starting with user; a system message may only come first)")
            content = message["content"]
            if want == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a str, got {type(content).__name__}")
                add(S["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(S["<|user_end|>"], 0)
                continue
            add(S["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind = part.get("type")
                    if kind == "text":
                        add(self.encode(part["text"]), 1)
                    elif kind == "python":  # the tool call is the assistant's own output: trained
                        add(S["<|python_start|>"], 1)
                        add(self.encode(part["text"]), 1)
                        add(S["<|python_end|>"], 1)
                    elif kind == "python_output":  # written by the tool at inference time: not trained
                        add(S["<|output_start|>"], 0)
                        add(self.encode(part["text"]), 0)
                        add(S["<|output_end|>"], 0)
                    else:
                        raise ValueError(f"message {i}: unknown assistant part type {kind!r} (expected text, python or python_output)")
            else:
                raise ValueError(f"message {i}: assistant content must be a str or a list of parts, got {type(content).__name__}")
            add(S["<|assistant_end|>"], 1)  # the model must learn when to stop
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation, max_tokens=2048):
        """Prompt for sampling: drop the final assistant reply, render, then open a new assistant turn."""
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion expects the last message to be from the assistant")
        messages.pop()
        ids, _ = self.render_conversation(conversation, max_tokens=max_tokens)
        return ids + [self.special_ids["<|assistant_start|>"]]

    def visualize_tokenization(self, ids, mask):
        """Debug helper: tokens in green are trained on (mask 1), red are not."""
        return "|".join(f"\033[{32 if m else 31}m{self.id_to_token(t)}\033[0m" for t, m in zip(ids, mask))


class TextStream:
    """Token ids in, text out, one piece at a time: bytes of a character split across tokens are held back
    until the character is complete, so a stream never shows half an emoji or a replacement character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(self.tokenizer.enc.decode_single_token_bytes(token))

    def flush(self):
        """Whatever is held back at the end (a truncated character becomes U+FFFD)."""
        return self.decoder.decode(b"", final=True)


def get_tokenizer():
    """The tokenizer trained by pipelines.tok_train, from $NANOCHAT_JAX_HOME/tokenizer."""
    path = os.path.join(get_base_dir(), "tokenizer")
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise FileNotFoundError(f"no tokenizer found in {path}; train one first with: python -m pipelines.tok_train")
    return Tokenizer.from_directory(path)
