"""
Benchmark our Rust BPE trainer against PyPI rustbpe 0.1.0: both train on the same text (held in
memory, so reading parquet is not timed), alternating, and the medians and their ratio are printed.
The merges must come out identical, or the benchmark fails.

python -m pipelines.tok_bench --data-dir DIR --max-chars 50000000 --threads 2
python -m pipelines.tok_bench --max-chars 5000000 --vocab-size 8192 --repeats 1   # quick, embedded corpus
"""
import argparse
import os
import statistics
import time

parser = argparse.ArgumentParser(description="Benchmark rust_bpe against rustbpe")
parser.add_argument("--data-dir", type=str, default=None, help="directory of parquet shards (default: the embedded corpus)")
parser.add_argument("--max-chars", type=int, default=50_000_000, help="characters of training text")
parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document, as in tok_train")
parser.add_argument("--vocab-size", type=int, default=65_536, help="vocabulary size incl. the 9 special tokens")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of each trainer (median reported)")
parser.add_argument("--threads", type=int, default=0, help="rayon threads for both (0 = all cores)")
args = parser.parse_args()
if args.threads:
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read by both crates' rayon pools on first use

import rustbpe  # noqa: E402  (after RAYON_NUM_THREADS is set)

from nanochat_jax import rust_bpe  # noqa: E402
from nanochat_jax.dataset import parquets_iter_batched  # noqa: E402
from nanochat_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN  # noqa: E402

texts, num_chars = [], 0
for batch in parquets_iter_batched("train", data_dir=args.data_dir):
    for doc in batch:
        texts.append(doc[:args.doc_cap])
        num_chars += len(texts[-1])
        if num_chars >= args.max_chars:
            break
    if num_chars >= args.max_chars:
        break
if num_chars < args.max_chars:
    print(f"note: the train split holds only {num_chars:,} characters, fewer than --max-chars")
num_ranks = args.vocab_size - len(SPECIAL_TOKENS)  # what tok_train asks the trainer for
print(f"{len(texts):,} documents, {num_chars:,} characters ({sum(len(t.encode()) for t in texts) / 1e6:.1f} MB UTF-8), "
      f"{num_ranks:,} ranks, threads: {os.environ.get('RAYON_NUM_THREADS', os.cpu_count())}")

trainers = {"rustbpe 0.1.0": rustbpe.Tokenizer, "rust_bpe (ours)": rust_bpe.Tokenizer}
times = {name: [] for name in trainers}
ranks = {}
for r in range(args.repeats):
    for name, cls in trainers.items():
        tok = cls()
        t0 = time.perf_counter()
        tok.train_from_iterator(iter(texts), num_ranks, pattern=SPLIT_PATTERN)
        times[name].append(time.perf_counter() - t0)
        ranks[name] = tok.get_mergeable_ranks()
        print(f"run {r + 1}/{args.repeats} {name:16s} {times[name][-1]:7.2f}s")

assert ranks["rustbpe 0.1.0"] == ranks["rust_bpe (ours)"], "the merges differ between the two trainers"
print(f"merges identical: {len(ranks['rust_bpe (ours)']):,} ranks")
medians = {name: statistics.median(t) for name, t in times.items()}
for name, m in medians.items():
    print(f"{name:16s} median {m:7.2f}s  ({num_chars / m / 1e6:.2f}M chars/s)")
ratio = medians["rustbpe 0.1.0"] / medians["rust_bpe (ours)"]
print(f"speed ratio (rustbpe time / ours): {ratio:.2f}x")
