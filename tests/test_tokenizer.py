"""
Tokenizer tests: round trips, special-token safety, the on-disk format, token_bytes and chat rendering.
One small tokenizer (vocab 800) is trained per module on ~300KB of Python's own stdlib sources plus a
multilingual paragraph, so everything runs offline in a few seconds.
"""
import base64
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from nanochat_jax import rust_bpe
from nanochat_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

VOCAB_SIZE = 800
STDLIB_FILES = ["argparse.py", "textwrap.py", "difflib.py", "statistics.py", "fractions.py", "calendar.py"]
MULTILINGUAL = (
    "The café on the corner serves crème brûlée and jalapeño toast. "
    "오늘 아침에 우리는 시장에 가서 사과와 배를 샀습니다. 날씨가 정말 좋았어요. "
    "我们明天早上去图书馆看书，然后一起吃午饭。 "
    "Привет, как дела? Всё хорошо. "
    "Party time 🎉🎉 and coffee ☕ with friends 👩‍👩‍👧 at 3:45pm, price €12.50.\n"
)
# no-surrogate unicode text: everything that can be UTF-8 encoded
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


def training_texts():
    """Documents the module's tokenizer is trained on (deterministic, offline)."""
    stdlib = os.path.dirname(os.__file__)
    for name in STDLIB_FILES:
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            yield f.read()
    for _ in range(50):  # repeated so multi-byte characters get merged (and partial UTF-8 tokens appear)
        yield MULTILINGUAL


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(training_texts(), VOCAB_SIZE)


@pytest.fixture(scope="module")
def crate():
    """The Rust trainer used directly, trained on the same text, for its own encode()."""
    bpe = rust_bpe.Tokenizer()
    bpe.train_from_iterator(training_texts(), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    return bpe


@pytest.fixture
def saved(tok, tmp_path):
    """A fresh copy of the tokenizer on disk, for tests that tamper with it."""
    path = str(tmp_path / "tokenizer")
    tok.save(path)
    return path


def rewrite_meta(path, **changes):
    with open(os.path.join(path, "tokenizer.json")) as f:
        meta = json.load(f)
    meta.update(changes)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(meta, f)


def write_ranks_with_valid_sha(path, ranks_text):
    """Write a ranks file and update the json's sha, so the parser (not the checksum) has to catch the problem."""
    with open(os.path.join(path, "ranks.tiktoken"), "wb") as f:
        f.write(ranks_text)
    rewrite_meta(path, ranks_sha256=hashlib.sha256(ranks_text).hexdigest())


def read_ranks(path):
    with open(os.path.join(path, "ranks.tiktoken"), "rb") as f:
        return f.read()

# -----------------------------------------------------------------------------
# round trips and special-token safety


@settings(max_examples=300, deadline=None)
@given(unicode_text)
@example("")
@example("hello world 🎉🎉👩‍👩‍👧 with emoji")
@example("汉字和かなとカタカナ、한국어도 섞어서")
@example("line one\r\n\tline two   \n\n  12345678901234567890")
def test_decode_inverts_encode_on_any_unicode(tok, s):
    """Byte-level BPE must be lossless on every encodable string, including emoji ZWJ sequences and CJK."""
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("bad", ["\ud800", "abc\udfffdef", "한국어\ud83d"])
def test_lone_surrogates_raise_instead_of_being_replaced(tok, bad):
    """tiktoken would silently turn a lone surrogate into U+FFFD; corrupt data should fail loudly instead."""
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode(bad)
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode(["fine", bad])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(unicode_text, st.sampled_from(SPECIAL_TOKENS)), max_size=8))
def test_special_token_strings_in_text_are_never_encoded_as_specials(tok, pieces):
    """A document that merely contains '<|bos|>' must not inject a real BOS (prompt injection / broken packing)."""
    text = "".join(pieces)
    ids = tok.encode(text)
    assert all(i < tok.get_bos_token_id() for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode([text, text]) == [ids, ids]


@settings(max_examples=100, deadline=None)
@given(unicode_text)
@example(MULTILINGUAL)
@example("x = 1234567 + 89; print(f'{x:,}')  # 12,345,678")
def test_tiktoken_wrapper_matches_rust_crate_encode(tok, crate, s):
    """Training uses the Rust crate, inference uses tiktoken: both must split and merge identically."""
    assert tok.encode(s) == crate.encode(s)


def test_rust_crate_training_is_deterministic_and_matches_wrapper_ranks(tok, crate):
    """The crate retrained on the same text gives the same ranks that the wrapper was built from."""
    ranks = sorted(crate.get_mergeable_ranks(), key=lambda br: br[1])
    assert [bytes(b) for b, _ in ranks] == tok.ranks
    assert crate.get_pattern() == tok.get_pattern() == SPLIT_PATTERN


def test_tiktoken_wrapper_matches_rust_crate_on_stdlib_source(tok, crate):
    texts = list(training_texts())[:3]
    for text in texts:
        assert tok.encode(text) == crate.encode(text)

# -----------------------------------------------------------------------------
# vocab layout, batching, prepend/append


def test_bos_comes_right_after_the_mergeable_ranks(tok):
    """Specials are appended after the ranks in nanochat's order, so <|bos|> == number of ranks."""
    assert len(tok.ranks) == VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert tok.get_bos_token_id() == len(tok.ranks)
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert SPECIAL_TOKENS[0] == "<|bos|>" and len(SPECIAL_TOKENS) == 9
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(len(tok.ranks), VOCAB_SIZE))
    assert tok.ranks[:256] == [bytes([i]) for i in range(256)]
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|eos|>")


def test_id_to_token_shows_text_and_specials(tok):
    assert tok.id_to_token(ord("a")) == "a"
    assert tok.id_to_token(tok.get_bos_token_id()) == "<|bos|>"
    assert tok.id_to_token(0xC3) == "\ufffd"  # a lone continuation-less byte is shown, not crashed on


def test_batched_encode_equals_single_encode(tok):
    texts = ["Hello there!", "", MULTILINGUAL, "def f(x):\n    return x ** 2\n"]
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode(texts)) == texts


def test_prepend_and_append_accept_ids_and_special_names(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    body = tok.encode("some text")
    assert tok.encode("some text", prepend="<|bos|>") == [bos] + body
    assert tok.encode("some text", prepend=bos, append="<|assistant_end|>") == [bos] + body + [end]
    assert tok.encode(["some text", ""], prepend=bos, append=end) == [[bos] + body + [end], [bos, end]]

# -----------------------------------------------------------------------------
# token_bytes (for bits per byte)


def test_token_bytes_counts_raw_bytes(tok):
    """Byte lengths come from raw token bytes: specials 0, every single byte 1, merges the length of their bytes."""
    tb = tok.token_bytes
    assert tb.dtype == np.int32 and tb.shape == (VOCAB_SIZE,)
    assert (tb[:256] == 1).all()  # including 0x80..0xff, which a str round trip would count as 3 (nanochat #693)
    assert (tb[tok.get_bos_token_id():] == 0).all()
    for i in range(256, len(tok.ranks)):
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i)) >= 2


def test_token_bytes_of_partial_utf8_token(tok):
    """Merges inside multi-byte characters produce tokens that are not valid UTF-8; count their bytes, not U+FFFD's."""
    partial = []
    for i in range(256, len(tok.ranks)):
        raw = tok.enc.decode_single_token_bytes(i)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial.append((i, raw))
    assert partial, "training text should yield at least one non-UTF-8 merged token"
    for i, raw in partial:
        assert tok.token_bytes[i] == len(raw)
    # the buggy str round trip (bytes -> U+FFFD -> 3 bytes) gets at least one of them wrong, e.g. a 2-byte Hangul prefix
    assert any(tok.token_bytes[i] != len(tok.id_to_token(i).encode("utf-8")) for i, _ in partial)

# -----------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(tok, saved):
    loaded = Tokenizer.from_directory(saved)
    assert sorted(os.listdir(saved)) == ["ranks.tiktoken", "token_bytes.npy", "tokenizer.json"]  # no temp files left
    assert loaded.ranks == tok.ranks and loaded.get_pattern() == tok.get_pattern()
    for text in [MULTILINGUAL, "<|bos|> not special", "    indented\n"]:
        assert loaded.encode(text) == tok.encode(text)
    assert np.array_equal(loaded.token_bytes, tok.token_bytes)
    assert np.array_equal(np.load(os.path.join(saved, "token_bytes.npy"), allow_pickle=False), tok.token_bytes)
    line = read_ranks(saved).splitlines()[300].split()
    assert base64.b64decode(line[0]) == tok.ranks[300] and line[1] == b"300"  # tiktoken's text layout


def test_saving_over_a_tokenizer_replaces_it_whole(tok, saved):
    """A retrained tokenizer replaces the old directory in one rename: nothing of the old one lingers."""
    smaller = Tokenizer(tok.ranks[:400], tok.get_pattern())
    smaller.save(saved)
    assert Tokenizer.from_directory(saved).get_vocab_size() == 400 + len(SPECIAL_TOKENS)
    assert os.listdir(os.path.dirname(saved)) == ["tokenizer"]  # no temp or backup directories left


def test_tampered_ranks_file_is_rejected(saved):
    """A single flipped byte in the ranks silently changes every encoding; the sha256 must catch it."""
    data = bytearray(read_ranks(saved))
    data[len(data) // 2] ^= 0x01
    with open(os.path.join(saved, "ranks.tiktoken"), "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ValueError, match=r"ranks\.tiktoken: sha256 mismatch"):
        Tokenizer.from_directory(saved)


def test_truncated_ranks_file_is_rejected(saved):
    """An interrupted copy leaves a shorter file; loading it would shift no ids but drop merges silently."""
    data = read_ranks(saved)
    with open(os.path.join(saved, "ranks.tiktoken"), "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="modified or truncated"):
        Tokenizer.from_directory(saved)


def test_ranks_parser_errors_name_the_line(saved):
    """Even with a matching sha (someone edited both files), malformed content is reported precisely."""
    lines = read_ranks(saved).splitlines(keepends=True)
    original = b"".join(lines)
    write_ranks_with_valid_sha(saved, b"".join(lines[:5] + [b"not-base64!! 5\n"] + lines[6:]))
    with pytest.raises(ValueError, match="bad line 6"):
        Tokenizer.from_directory(saved)
    write_ranks_with_valid_sha(saved, b"".join(lines[:5] + [lines[5].replace(b" 5", b" 7")] + lines[6:]))
    with pytest.raises(ValueError, match=r"not 0\.\.n-1.*line 6 has rank 7"):
        Tokenizer.from_directory(saved)
    swapped = lines[:65] + [lines[66].replace(b" 66", b" 65"), lines[65].replace(b" 65", b" 66")] + lines[67:]
    write_ranks_with_valid_sha(saved, b"".join(swapped))
    with pytest.raises(ValueError, match="first 256 ranks must be the single bytes"):
        Tokenizer.from_directory(saved)
    write_ranks_with_valid_sha(saved, b"".join(lines[:-1]))
    with pytest.raises(ValueError, match="num_ranks"):
        Tokenizer.from_directory(saved)
    write_ranks_with_valid_sha(saved, original)
    Tokenizer.from_directory(saved)  # and the untouched file still loads


def test_edited_json_is_rejected(saved):
    rewrite_meta(saved, special_tokens=SPECIAL_TOKENS[::-1])
    with pytest.raises(ValueError, match=r"tokenizer\.json: special_tokens"):
        Tokenizer.from_directory(saved)
    rewrite_meta(saved, special_tokens=SPECIAL_TOKENS, num_ranks="791")
    with pytest.raises(ValueError, match="malformed field 'num_ranks'"):
        Tokenizer.from_directory(saved)
    rewrite_meta(saved, num_ranks=VOCAB_SIZE)
    with pytest.raises(ValueError, match="num_ranks=800"):
        Tokenizer.from_directory(saved)
    with open(os.path.join(saved, "tokenizer.json"), "w") as f:
        f.write('{"pattern": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not valid JSON"):
        Tokenizer.from_directory(saved)


def test_missing_or_stale_files_are_rejected(saved, tmp_path):
    np.save(os.path.join(saved, "token_bytes.npy"), np.ones(VOCAB_SIZE, dtype=np.int32))
    with pytest.raises(ValueError, match=r"token_bytes\.npy: does not match"):
        Tokenizer.from_directory(saved)
    copy = str(tmp_path / "copy")
    shutil.copytree(saved, copy)
    os.remove(os.path.join(copy, "ranks.tiktoken"))
    with pytest.raises(ValueError, match=r"ranks\.tiktoken: missing file"):
        Tokenizer.from_directory(copy)

# -----------------------------------------------------------------------------
# chat rendering


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute it. "},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": "It is 84."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_render_conversation_ids_and_mask_follow_the_spec(tok):
    """Only what the assistant writes is trained: its text, tool calls and <|assistant_end|>; never tool output."""
    S, E = tok.encode_special, tok.encode
    expected = [
        ([S("<|bos|>")], 0),
        ([S("<|user_start|>")], 0), (E("Be brief.\n\nWhat is 12*7?"), 0), ([S("<|user_end|>")], 0),
        ([S("<|assistant_start|>")], 0),
        (E("Let me compute it. "), 1),
        ([S("<|python_start|>")], 1), (E("12*7"), 1), ([S("<|python_end|>")], 1),
        ([S("<|output_start|>")], 0), (E("84"), 0), ([S("<|output_end|>")], 0),
        (E("It is 84."), 1),
        ([S("<|assistant_end|>")], 1),
        ([S("<|user_start|>")], 0), (E("Thanks!"), 0), ([S("<|user_end|>")], 0),
        ([S("<|assistant_start|>")], 0), (E("You're welcome."), 1), ([S("<|assistant_end|>")], 1),
    ]
    ids, mask = tok.render_conversation(CONVERSATION)
    assert ids == [i for chunk, _ in expected for i in chunk]
    assert mask == [m for chunk, m in expected for _ in chunk]
    assert CONVERSATION["messages"][0]["role"] == "system"  # merging the system prompt did not mutate the input


def test_render_conversation_truncates_ids_and_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    short_ids, short_mask = tok.render_conversation(CONVERSATION, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


@pytest.mark.parametrize("messages, error", [
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user', expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}], "message 2 has role 'system'"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "message 0: user content must be a str"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "b"}]}], "unknown assistant part type 'image'"),
    ([], "no messages"),
])
def test_render_conversation_rejects_malformed_conversations(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_opens_a_new_assistant_turn(tok):
    """The prompt is everything before the last assistant reply, ending in <|assistant_start|> for the model to continue."""
    prompt = tok.render_for_completion(CONVERSATION)
    history = {"messages": CONVERSATION["messages"][:-1]}
    assert prompt == tok.render_conversation(history)[0] + [tok.encode_special("<|assistant_start|>")]
    assert len(CONVERSATION["messages"]) == 5  # the caller's conversation is untouched
    with pytest.raises(ValueError, match="last message"):
        tok.render_for_completion(history)


def test_text_stream_holds_back_split_characters():
    """Byte tokens of an emoji and CJK arrive one by one; the stream only ever shows whole characters,
    and a character cut off at the end becomes U+FFFD on flush."""
    from nanochat_jax.tokenizer import TextStream
    tok = Tokenizer([bytes([b]) for b in range(256)])
    text = "a👋你好!"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text)]
    assert "".join(pieces) + stream.flush() == text
    assert [p for p in pieces if p] == ["a", "👋", "你", "好", "!"]
    cut = TextStream(tok)
    assert [cut.push(t) for t in "👋".encode()[:2]] == ["", ""] and cut.flush() == "\ufffd"
