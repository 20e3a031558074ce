//! rust_bpe: a byte-level BPE trainer over regex chunks, exposed to Python with PyO3.
//!
//! The Python API matches the PyPI package `rustbpe` 0.1.0 so the two can be swapped and compared:
//! `Tokenizer()`, `.train_from_iterator(iterator, vocab_size, buffer_size=8192, pattern=None)`,
//! `.get_pattern()`, `.get_mergeable_ranks()`, `.encode(text)`, `.batch_encode(texts)`, `.decode(ids)`,
//! `.vocab_size`. One difference: our default split pattern groups digits 1-2 (nanochat's choice),
//! where rustbpe's built-in default groups them 1-3. Pass `pattern=` explicitly to compare the two.
//!
//! Training, in three phases:
//! 1. pull strings from the Python iterator in buffers (GIL held), then split them with the regex
//!    and count unique chunks in parallel with rayon (GIL released);
//! 2. turn each unique chunk into a word of byte ids and count adjacent pairs in parallel;
//! 3. merge greedily: a max-heap keyed by (count, then the smaller pair) with lazy refresh,
//!    updating only the words that contain the merged pair.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::AHashMap;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;

/// GPT-4's cl100k split pattern, except that numbers are split into groups of 1-2 digits.
const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

type Pair = (u32, u32);

// ------------------------------------------------------------------------------------------------
// Splitting text into chunks

/// The GPT-4 pattern with numbers grouped 1 to `digits` at a time (3 is cl100k, 2 is nanochat's).
fn gpt4_pattern(digits: u32) -> String {
    format!(r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?+\p{{L}}+|\p{{N}}{{1,{digits}}}| ?[^\s\p{{L}}\p{{N}}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
}

/// A regex splits text into chunks. The GPT-4 family of patterns needs backtracking only for the
/// lookahead in `\s+(?!\S)`: its possessive quantifiers never give anything back in this pattern,
/// so they can be plain ones. Those patterns run on the much faster DFA-based `regex` crate with the
/// lookahead emulated (`Dfa`); any other pattern runs on `fancy_regex` as written (`Backtracking`).
enum Splitter {
    Dfa(regex::Regex),
    Backtracking(fancy_regex::Regex),
}

impl Splitter {
    fn new(pattern: &str) -> PyResult<Self> {
        let invalid = |e: String| PyValueError::new_err(format!("invalid regex pattern {pattern:?}: {e}"));
        for digits in 1..=3 {
            if pattern == gpt4_pattern(digits) {
                let plain = format!(r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,{digits}}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]|\s+");
                return regex::Regex::new(&plain).map(Splitter::Dfa).map_err(|e| invalid(e.to_string()));
            }
        }
        fancy_regex::Regex::new(pattern).map(Splitter::Backtracking).map_err(|e| invalid(e.to_string()))
    }

    /// Call `f` on every chunk of `text`, in order.
    fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Backtracking(re) => {
                for m in re.find_iter(text) {
                    f(m.map_err(|e| format!("regex failed while splitting text: {e}"))?.as_str());
                }
            }
            Splitter::Dfa(re) => {
                let mut pos = 0;
                while let Some(m) = re.find_at(text, pos) {
                    let chunk = &text[m.start()..m.end()];
                    let mut end = m.end();
                    // Only the final `\s+` can end a chunk in a blank other than \r or \n. The original
                    // `\s+(?!\S)` stops one blank short of a following non-blank, leaving that blank to
                    // start the next chunk (" word"); a single blank has nothing to leave.
                    if let Some(last) = chunk.chars().next_back() {
                        if last.is_whitespace() && last != '\r' && last != '\n' && end < text.len() && chunk.len() > last.len_utf8() {
                            end -= last.len_utf8();
                        }
                    }
                    f(&text[m.start()..end]);
                    pos = end;
                }
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Training

/// Count every regex chunk of `texts`. Each rayon task folds into its own map and the maps are
/// summed at the end, so no map is allocated per document. Keys borrow from `texts`.
fn count_chunks<'a>(splitter: &Splitter, texts: &'a [String]) -> Result<AHashMap<&'a str, i64>, String> {
    texts
        .par_iter()
        .try_fold(AHashMap::new, |mut counts, text| {
            splitter.for_each_chunk(text, |chunk| *counts.entry(chunk).or_insert(0) += 1)?;
            Ok(counts)
        })
        .try_reduce(AHashMap::new, |mut a, mut b| {
            if a.len() < b.len() {
                std::mem::swap(&mut a, &mut b);
            }
            for (k, v) in b {
                *a.entry(k).or_insert(0) += v;
            }
            Ok(a)
        })
}

/// Merge every non-overlapping occurrence of `pair` in `word` (left to right) into `new_id`, in place.
/// Calls `delta(pair, +1/-1)` for each adjacent pair that appears or disappears.
/// Example: [a, b, a, b, c] with (a, b) -> X gives [X, X, c]; (a,b) -1 twice, (b,a) -1, (b,c) -1,
/// (X,X) +1 and (X,c) +1 (the intermediate (X,a) is added and removed again).
fn merge_word(word: &mut Vec<u32>, pair: Pair, new_id: u32, delta: &mut impl FnMut(Pair, i64)) {
    let (a, b) = pair;
    let n = word.len();
    let (mut read, mut write) = (0, 0);
    while read < n {
        if read + 1 < n && word[read] == a && word[read + 1] == b {
            if write > 0 {
                let left = word[write - 1]; // already rewritten, so it may itself be new_id
                delta((left, a), -1);
                delta((left, new_id), 1);
            }
            delta(pair, -1);
            if read + 2 < n {
                let right = word[read + 2];
                delta((b, right), -1);
                delta((new_id, right), 1);
            }
            word[write] = new_id;
            read += 2;
        } else {
            word[write] = word[read];
            read += 1;
        }
        write += 1;
    }
    word.truncate(write);
}

/// One heap entry: a pair, its count when pushed, and the words that may contain it.
struct MergeJob {
    pair: Pair,
    count: i64,
    words: Vec<u32>,
}

impl Ord for MergeJob {
    // Max-heap on count; among equal counts the smaller pair wins, which makes training deterministic.
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}
impl PartialOrd for MergeJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for MergeJob {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for MergeJob {}

/// Pair counts (weighted by word frequency) and, per pair, the indices of the words holding it.
fn count_pairs(words: &[Vec<u32>], freqs: &[i64]) -> (AHashMap<Pair, i64>, AHashMap<Pair, Vec<u32>>) {
    words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::new(), AHashMap::new()),
            |(mut counts, mut where_): (AHashMap<Pair, i64>, AHashMap<Pair, Vec<u32>>), (i, w)| {
                for p in w.windows(2) {
                    let pair = (p[0], p[1]);
                    *counts.entry(pair).or_insert(0) += freqs[i];
                    let list = where_.entry(pair).or_default();
                    if list.last() != Some(&(i as u32)) {
                        list.push(i as u32);
                    }
                }
                (counts, where_)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut c1, mut w1), (c2, w2)| {
                for (k, v) in c2 {
                    *c1.entry(k).or_insert(0) += v;
                }
                for (k, v) in w2 {
                    w1.entry(k).or_default().extend(v); // folds cover disjoint word ranges: no duplicates
                }
                (c1, w1)
            },
        )
}

/// The BPE merge loop: returns the merges in order, as (pair, new id).
fn learn_merges(mut words: Vec<Vec<u32>>, freqs: Vec<i64>, num_merges: u32) -> Vec<(Pair, u32)> {
    let (mut counts, mut where_) = count_pairs(&words, &freqs);
    let mut heap: BinaryHeap<MergeJob> = where_
        .drain()
        .filter_map(|(pair, words)| {
            let count = counts[&pair];
            (count > 0).then_some(MergeJob { pair, count, words })
        })
        .collect();

    let mut merges = Vec::with_capacity(num_merges as usize);
    while (merges.len() as u32) < num_merges {
        let Some(mut job) = heap.pop() else { break };
        // Lazy refresh: a pair's count only falls after it is pushed, so a stale entry is re-queued
        // with its true count, and an entry whose count is current is the true maximum.
        let current = counts.get(&job.pair).copied().unwrap_or(0);
        if job.count != current {
            if current > 0 {
                job.count = current;
                heap.push(job);
            }
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push((job.pair, new_id));

        // Rewrite only the words that held the pair. Pairs that gain occurrences all contain new_id,
        // so they are new keys: collect their words and push them once, after this merge.
        let mut created: AHashMap<Pair, Vec<u32>> = AHashMap::new();
        for &wi in &job.words {
            let freq = freqs[wi as usize];
            merge_word(&mut words[wi as usize], job.pair, new_id, &mut |pair, d| {
                *counts.entry(pair).or_insert(0) += d * freq;
                if d > 0 {
                    let list = created.entry(pair).or_default();
                    if list.last() != Some(&wi) {
                        list.push(wi);
                    }
                }
            });
        }
        counts.remove(&job.pair);
        for (pair, words) in created {
            let count = counts.get(&pair).copied().unwrap_or(0);
            if count > 0 {
                heap.push(MergeJob { pair, count, words });
            }
        }
    }
    merges
}

// ------------------------------------------------------------------------------------------------
// Encoding

/// Encode one chunk: repeatedly merge the adjacent pair with the lowest merge id.
fn encode_chunk(chunk: &[u8], merges: &AHashMap<Pair, u32>, out: &mut Vec<u32>) {
    let mut ids: Vec<u32> = chunk.iter().map(|&b| b as u32).collect();
    while ids.len() >= 2 {
        let best = ids
            .windows(2)
            .enumerate()
            .filter_map(|(i, p)| merges.get(&(p[0], p[1])).map(|&id| (id, i)))
            .min();
        let Some((new_id, i)) = best else { break };
        ids[i] = new_id; // the leftmost occurrence of the lowest-ranked pair
        ids.remove(i + 1);
    }
    out.extend_from_slice(&ids);
}

// ------------------------------------------------------------------------------------------------
// The Python class

#[pyclass(module = "nanochat_jax.rust_bpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: AHashMap<Pair, u32>, // (left, right) -> new id; the id doubles as the merge rank
}

impl Tokenizer {
    fn encode_text(&self, text: &str) -> PyResult<Vec<u32>> {
        let mut out = Vec::new();
        self.splitter
            .for_each_chunk(text, |chunk| encode_chunk(chunk.as_bytes(), &self.merges, &mut out))
            .map_err(PyRuntimeError::new_err)?;
        Ok(out)
    }

    /// Raw bytes of every token id, 0..vocab_size.
    fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mut ordered: Vec<(u32, Pair)> = self.merges.iter().map(|(&p, &id)| (id, p)).collect();
        ordered.sort_unstable();
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for (_, (left, right)) in ordered {
            let mut bytes = vocab[left as usize].clone();
            bytes.extend_from_slice(&vocab[right as usize]);
            vocab.push(bytes);
        }
        vocab
    }
}

#[pymethods]
impl Tokenizer {
    /// An untrained tokenizer: 256 byte tokens and the default split pattern.
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Tokenizer { pattern: DEFAULT_PATTERN.to_string(), splitter: Splitter::new(DEFAULT_PATTERN)?, merges: AHashMap::new() })
    }

    /// Train from an iterable of str. `vocab_size` counts the 256 byte tokens, so it learns
    /// `vocab_size - 256` merges (fewer if the text runs out of pairs).
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 || vocab_size > u32::MAX as i64 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be positive, got {buffer_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern)?;
        let mut iter = iterator
            .try_iter()
            .map_err(|_| PyTypeError::new_err("train_from_iterator expects an iterable of str"))?;

        // Phase 1: chunk counts. Owned keys only for chunks never seen before.
        let mut chunk_counts: AHashMap<String, i64> = AHashMap::new();
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size as usize);
        let mut seen = 0usize;
        let mut exhausted = false;
        while !exhausted {
            buffer.clear();
            while buffer.len() < buffer_size as usize {
                let Some(item) = iter.next() else {
                    exhausted = true;
                    break;
                };
                let item = item?;
                let text: String = item.extract().map_err(|_| {
                    let type_name = item.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
                    PyTypeError::new_err(format!("item {seen} of the training iterator is {type_name}, expected str"))
                })?;
                buffer.push(text);
                seen += 1;
            }
            let local = py.detach(|| count_chunks(&splitter, &buffer)).map_err(PyRuntimeError::new_err)?;
            for (chunk, n) in local {
                match chunk_counts.get_mut(chunk) {
                    Some(total) => *total += n,
                    None => {
                        chunk_counts.insert(chunk.to_string(), n);
                    }
                }
            }
        }

        // Phases 2 and 3 touch no Python objects.
        let num_merges = (vocab_size - 256) as u32;
        let merges = py.detach(move || {
            let (words, freqs): (Vec<Vec<u32>>, Vec<i64>) = chunk_counts
                .into_iter()
                .map(|(chunk, n)| (chunk.bytes().map(|b| b as u32).collect(), n))
                .unzip();
            learn_merges(words, freqs, num_merges)
        });
        self.pattern = pattern;
        self.splitter = splitter;
        self.merges = merges.into_iter().collect();
        Ok(())
    }

    /// The regex pattern used to split text into chunks.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// The chunks that `text` is split into before BPE (merges never cross them).
    fn split(&self, text: &str) -> PyResult<Vec<String>> {
        let mut chunks = Vec::new();
        self.splitter.for_each_chunk(text, |c| chunks.push(c.to_string())).map_err(PyRuntimeError::new_err)?;
        Ok(chunks)
    }

    /// Number of tokens: 256 bytes plus one per merge.
    #[getter]
    fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }

    /// (token bytes, rank) for every token in rank order, ready for `tiktoken.Encoding`.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.token_bytes().iter().enumerate().map(|(i, b)| (PyBytes::new(py, b), i as u32)).collect()
    }

    /// Encode a string into token ids.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| self.encode_text(text))
    }

    /// Encode several strings in parallel.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        py.detach(|| texts.par_iter().map(|t| self.encode_text(t)).collect())
    }

    /// Decode token ids to a string; byte sequences that are not UTF-8 become U+FFFD.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let vocab = self.token_bytes();
        let mut bytes = Vec::new();
        for id in ids {
            let token = vocab
                .get(id as usize)
                .ok_or_else(|| PyValueError::new_err(format!("unknown token id {id} (vocab size {})", vocab.len())))?;
            bytes.extend_from_slice(token);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[pymodule]
fn rust_bpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
