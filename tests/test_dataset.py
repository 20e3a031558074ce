"""Reading pretraining shards: the embedded corpus, the split rule, and clear errors on bad data."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax import dataset


def test_embedded_corpus_is_real_english_in_nanochat_shard_format():
    data_dir = dataset.default_data_dir()
    paths = dataset.list_parquet_files(data_dir)
    assert len(paths) >= 3 and os.path.basename(paths[0]) == "shard_00000.parquet"
    for path in paths:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(i).num_rows <= dataset.ROW_GROUP_SIZE for i in range(pf.num_row_groups))
    train = [doc for batch in dataset.parquets_iter_batched("train") for doc in batch]
    val = [doc for batch in dataset.parquets_iter_batched("val") for doc in batch]
    assert sum(map(len, train)) > 10_000_000  # a few million tokens: enough for the tiny tier
    assert 0 < len(val) < 0.1 * len(train)
    long_docs = [d for d in train if len(d) > dataset.EMBEDDED_MAX_DOC_CHARS]
    assert len(long_docs) < 0.01 * len(train) and all("\n\n" not in d for d in long_docs)  # one long paragraph each
    assert " the " in train[0] and not set(train) & set(val)


def test_row_groups_are_strided_across_processes(tmp_path):
    """Process r of W reads row groups r, r+W, ...: together they cover each shard exactly once."""
    docs = [f"document {i}" for i in range(5000)]
    dataset.write_shards(docs, str(tmp_path / "d"), docs_per_shard=4096, num_val_docs=100)  # 4 row groups in shard 0
    everything = [d for b in dataset.parquets_iter_batched("train", str(tmp_path / "d")) for d in b]
    strided = [d for r in range(3) for b in dataset.parquets_iter_batched("train", str(tmp_path / "d"), start=r, step=3) for d in b]
    assert everything == docs[:4900]
    assert sorted(strided) == sorted(everything)


def test_missing_and_empty_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(dataset.parquets_iter_batched("train", str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="holds no .parquet shards"):
        next(dataset.parquets_iter_batched("train", str(tmp_path)))


def test_bad_shards_are_named(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "shard_00000.parquet")
    (tmp_path / "shard_00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"shard_00000.parquet has no string column 'text'"):
        next(dataset.parquets_iter_batched("train", str(tmp_path)))
    with pytest.raises(ValueError, match=r"shard_00001.parquet is not a readable parquet file"):
        next(dataset.parquets_iter_batched("val", str(tmp_path)))
