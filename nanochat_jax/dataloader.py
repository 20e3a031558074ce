"""
Pretraining batches: parquet row groups -> tokens (<|bos|> before every document) -> rows of T+1
tokens, inputs and targets shifted by one. Built on grain:
- a MapDataset of this process's row groups (process r of W reads row groups r, r+W, ... of the
  split, counted across shards), repeated over epochs and read ahead by grain's threads; being random access,
  any row group can be read again, so the packers below restore their buffers from a few indices
- a packing iterator on top, in one of two modes:
  stream  (nanochat v1) one flat token stream cut into batches of B·T+1 tokens; rows may start mid-document
  bestfit (nanochat HEAD) every row starts at a document: fill it with the largest buffered document
          that fits; when none fits, crop the shortest to fill the row and drop its tail

The iterator's state is small JSON (grain's next index plus the packer's buffer as indices), saved
with orbax through grain.checkpoint; after a restore the next batch is bit-identical.
"""
import bisect
import sys

import grain
import numpy as np

from nanochat_jax.dataset import open_shard, split_paths


def row_group_units(split, data_dir=None, process_index=0, process_count=1):
    """(shard path, row group) pairs this process reads, in order: process r of W takes row groups
    r, r+W, r+2W, ... of the split's row groups counted across all its shards."""
    paths = split_paths(split, data_dir)
    every = [(p, rg) for p in paths for rg in range(open_shard(p).num_row_groups)]
    units = every[process_index::process_count]  # strided over all row groups, so small shards split evenly too
    if not units and split == "val":
        units = every  # fewer val row groups than processes: each reads them all; bpb (a ratio of sums) is unchanged
    if not units:
        raise ValueError(f"process {process_index} of {process_count} gets no row groups of the {split} split: fewer row groups than processes")
    return units


class TokenizedRowGroups(grain.MapDataset):
    """Element i: row group i % n of epoch i // n, as a list of int32 token arrays, each starting with <|bos|>."""

    def __init__(self, units, tokenizer, epochs=None, tokenizer_threads=4):
        super().__init__()
        self.units, self.tokenizer, self.epochs, self.tokenizer_threads = units, tokenizer, epochs, tokenizer_threads
        self.bos = tokenizer.get_bos_token_id()

    def __len__(self):
        return len(self.units) * self.epochs if self.epochs else sys.maxsize

    def __getitem__(self, index):
        path, rg = self.units[index % len(self.units)]
        shard = open_shard(path)  # names the file if it is not readable parquet with a text column
        try:
            texts = shard.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        except Exception as e:
            raise ValueError(f"shard {path}: cannot read row group {rg}: {e}") from None
        ids = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        return {"index": index, "docs": [np.asarray(d, np.int32) for d in ids]}


class PackedBatches(grain.DatasetIterator):
    """Batches {'inputs': (B, T), 'targets': (B, T)} int32, packed from row groups in `mode`."""

    def __init__(self, row_groups, read_options, batch_size, seq_len, mode="stream", buffer_docs=1000):
        assert mode in ("stream", "bestfit"), f"unknown packing mode {mode!r}"
        self.row_groups, self.B, self.T, self.mode, self.buffer_docs = row_groups, batch_size, seq_len, mode, buffer_docs
        super().__init__(row_groups.to_iter_dataset(read_options).__iter__())
        self._reset(first_index=0)

    def _reset(self, first_index):
        # stream: buffered row groups first_index..(next one to read - 1) and the offset into the first
        self.stream = []  # [(row group index, its tokens concatenated)]
        self.stream_head = (first_index, 0)
        # bestfit: documents keyed (length, row group index, doc index): sorted, so the pick is a bisect
        self.doc_keys, self.doc_tokens = [], {}

    def _pull(self):
        element = next(self._parent)
        if self.mode == "stream":
            self.stream.append((element["index"], np.concatenate(element["docs"])))
        else:
            for j, doc in enumerate(element["docs"]):
                self._add_doc((len(doc), element["index"], j), doc)

    def _add_doc(self, key, doc):
        bisect.insort(self.doc_keys, key)
        self.doc_tokens[key] = doc

    def _take_doc(self, pos):
        key = self.doc_keys.pop(pos)
        return self.doc_tokens.pop(key)

    def __next__(self):
        if self.mode == "stream":
            tokens = self._next_stream(self.B * self.T + 1)
            return {"inputs": tokens[:-1].reshape(self.B, self.T), "targets": tokens[1:].reshape(self.B, self.T)}
        rows = np.stack([self._next_bestfit_row(self.T + 1) for _ in range(self.B)])
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

    def _next_stream(self, n):
        first, offset = self.stream_head
        while sum(len(t) for _, t in self.stream) - offset < n:
            self._pull()
        out = np.concatenate([t for _, t in self.stream])[offset:offset + n]
        offset += n
        while self.stream and offset >= len(self.stream[0][1]):  # drop row groups used up
            offset -= len(self.stream.pop(0)[1])
            first += 1
        self.stream_head = (first, offset)
        return out

    def _next_bestfit_row(self, n):
        row, remaining = [], n
        while remaining:
            try:
                while len(self.doc_keys) < self.buffer_docs:
                    self._pull()
            except StopIteration:  # the last epoch ran out: use up what is buffered
                if not self.doc_keys:
                    raise
            pos = bisect.bisect_right(self.doc_keys, (remaining, sys.maxsize, sys.maxsize)) - 1  # largest doc <= remaining
            if pos >= 0:
                doc = self._take_doc(pos)
            else:
                doc = self._take_doc(0)[:remaining]  # nothing fits: crop the shortest, drop its tail
            row.append(doc)
            remaining -= len(doc)
        return np.concatenate(row)

    # -----------------------------------------------------------------------------
    # Checkpointable state: grain's own position plus our buffer as indices

    def get_state(self):
        parent = self._parent.get_state()
        state = {"parent": parent, "mode": self.mode}
        if self.mode == "stream":
            state["stream_head"] = list(self.stream_head)
        else:
            state["docs"] = [[rg, j] for _, rg, j in self.doc_keys]
        return state

    def set_state(self, state):
        if state.get("mode") != self.mode:
            raise ValueError(f"loader state is for packing mode {state.get('mode')!r}, this loader packs {self.mode!r}")
        self._parent.set_state(state["parent"])
        next_index = state["parent"]["next_index"]
        if self.mode == "stream":
            first, offset = state["stream_head"]
            self._reset(first)
            self.stream = [(i, np.concatenate(self.row_groups[i]["docs"])) for i in range(first, next_index)]
            self.stream_head = (first, offset)
        else:
            self._reset(0)
            by_group = {}
            for rg, j in state["docs"]:
                by_group.setdefault(rg, []).append(j)
            for rg, js in by_group.items():
                docs = self.row_groups[rg]["docs"]  # re-read and re-tokenize: deterministic
                for j in js:
                    self._add_doc((len(docs[j]), rg, j), docs[j])

    def epoch(self):
        """Epochs completed by the row-group reader so far (0 during the first pass)."""
        return self._parent.get_state()["next_index"] // len(self.row_groups.units)


def make_loader(tokenizer, batch_size, seq_len, split="train", data_dir=None, mode="stream", epochs=None,
                process_index=0, process_count=1, threads=2, prefetch=8, buffer_docs=1000):
    """The packed-batch iterator for this process. split='val' reads once through, in order (bpb eval)."""
    units = row_group_units(split, data_dir, process_index, process_count)
    row_groups = TokenizedRowGroups(units, tokenizer, epochs=1 if split == "val" else epochs, tokenizer_threads=threads)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))  # grain caps threads at the buffer
    return PackedBatches(row_groups, read_options, batch_size, seq_len, mode=mode, buffer_docs=buffer_docs)
