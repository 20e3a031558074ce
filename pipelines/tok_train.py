"""
Train the BPE tokenizer on the training split of the pretraining shards and save it under
$NANOCHAT_JAX_HOME/tokenizer (ranks as text, no pickle).

python -m pipelines.tok_train                                   # embedded corpus, 65,536 tokens
python -m pipelines.tok_train --max-chars 2000000000 --data-dir DIR
python -m pipelines.tok_train --vocab-size 4096 --max-chars 1000000   # a few seconds on a CPU
"""
import argparse
import os
import time


from nanochat_jax.common import get_base_dir
from nanochat_jax.report import get_report
from nanochat_jax.dataset import parquets_iter_batched
from nanochat_jax.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description="Train the BPE tokenizer")
parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document (its head)")
parser.add_argument("--vocab-size", type=int, default=65_536, help="vocabulary size, 256 bytes and 9 special tokens included")
parser.add_argument("--data-dir", type=str, default=None, help="directory of parquet shards (default: the embedded corpus)")
parser.add_argument("--out-dir", type=str, default=None, help="where to save (default: $NANOCHAT_JAX_HOME/tokenizer)")
args = parser.parse_args()
out_dir = args.out_dir or os.path.join(get_base_dir(), "tokenizer")
print(f"max_chars: {args.max_chars:,} | doc_cap: {args.doc_cap:,} | vocab_size: {args.vocab_size:,} | data_dir: {args.data_dir or '(embedded)'}")

# -----------------------------------------------------------------------------
# Text: documents of the train split in order, each cut to doc_cap, until max_chars

num_chars = 0
def text_iterator():
    global num_chars
    for batch in parquets_iter_batched("train", data_dir=args.data_dir):
        for doc in batch:
            doc = doc[:args.doc_cap]
            num_chars += len(doc)
            yield doc
            if num_chars >= args.max_chars:
                return

# -----------------------------------------------------------------------------
# Train and save

t0 = time.time()
tokenizer = Tokenizer.train_from_iterator(text_iterator(), args.vocab_size)
train_time = time.time() - t0
print(f"trained on {num_chars:,} characters in {train_time:.2f}s ({num_chars / train_time / 1e6:.2f}M chars/s)")
if tokenizer.get_vocab_size() < args.vocab_size:
    print(f"warning: the text ran out of pairs to merge; the vocabulary has {tokenizer.get_vocab_size():,} tokens, not {args.vocab_size:,}")

# A round trip through ordinary text, special-looking strings and non-ASCII must be lossless
sample = "Hello world! This is a test.\nNumbers: 123, 4567, 89.\nContractions: I'm, you're, it's\nSpecial: <|bos|> @#$%\nUnicode: 你好世界 🌍 naïve"
assert tokenizer.decode(tokenizer.encode(sample)) == sample, "tokenizer round trip failed"
tokenizer.save(out_dir)

tb = tokenizer.token_bytes[tokenizer.token_bytes > 0]  # specials count 0 bytes
print(f"token_bytes over {len(tb):,} tokens: min {tb.min()}, max {tb.max()}, mean {tb.mean():.2f}, std {tb.std():.2f}")
print(f"tokenizer saved to {out_dir}")
get_report().log("Tokenizer training", [vars(args), {
    "train time (s)": train_time, "characters": num_chars, "chars per second": num_chars / train_time,
    "vocab size": tokenizer.get_vocab_size(), "token_bytes min": int(tb.min()), "token_bytes max": int(tb.max()),
    "token_bytes mean": float(tb.mean()), "token_bytes std": float(tb.std())}])
