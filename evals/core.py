"""
CORE (DCLM, arXiv 2406.11794) scored as nanochat v1 scores it, but batched.

The scoring is nanochat's, item for item:
- each task's rows are shuffled with random.Random(1337) and optionally cut to max_per_task;
- item idx gets num_fewshot examples drawn with random.Random(1234 + idx) from the other items, each
  written out with its answer and followed by a blank line;
- prompts: multiple choice, one per choice (query + delimiter + choice); schema, one per context option
  (option + delimiter + continuation); language modeling, the context (trimmed) + delimiter, without
  (stripped) and with the continuation; every sequence starts with <|bos|>;
- the scored span: multiple choice, the tokens after the choices' common token prefix; schema, the
  options' common token suffix; language modeling, the tokens of `with` beyond `without`;
- multiple choice and schema pick the sequence with the lowest mean cross-entropy over its span
  (nanochat's list.index(min(...)), NaN for an empty span and all); language modeling is right iff the
  argmax prediction is every token of the continuation;
- centered = (acc - 0.01 b) / (1 - 0.01 b) with b the random baseline (%) of eval_meta_data.csv, and
  CORE = the mean of the centered scores.
nanochat also crops sequences on the left to a model's maximum length (GPT-2's 1024). Our GPT has no
such limit (rotary tables are computed for any position), so nothing is cropped.

What differs is how the work is laid out (nanochat runs one eager forward per item, ~96 min for the
bundle at d20):
- a task's items are rendered and tokenized in one threaded tiktoken batch, in a background thread
  while the device works on the task before;
- each item becomes one "tree": the prefix that all its sequences share, and after it the rest of each
  sequence, packed one after another. The prefix runs once, through the causal kernel of the training
  path; the rests attend to its keys and to their own earlier tokens (GPT.features_shared_prefix):
  exactly what they see in the whole sequences, so the losses are the same to rounding. The bundle is
  then 54M tokens instead of 157M (10-shot hellaswag: 27%). share_prefix=False runs every sequence
  whole (GPT.features), for comparison. The blocks run as one lax.scan, compiled once rather than
  once per layer (unrolled, a d20 program took ~10 s to compile on an H200);
- trees are padded (with <|bos|>) to a few fixed shapes: prefix and rest lengths rounded up to the
  buckets below, rows per batch = batch_tokens // length (fewer for a small group). merge_shapes then
  joins shapes while a compile would cost more than the extra padding, counting programs already
  compiled as free, so a run compiles a handful of programs and a second run (training's periodic
  evals) none;
- lm_head runs only on the rests' states: per-token loss and argmax are taken on the device (never
  (B, T, V) logits), and only per-sequence sums, counts and misses come back;
- rows lie over the mesh's batch axes, items are strided over processes, and every process gets every
  result back (a replicated output), so process 0 can write.

    out = evaluate_core(model, tokenizer, "../shared/data/eval_bundle.zip", max_per_task=500)
    out["core"], out["results"]["hellaswag"], out["timings"]["hellaswag"]
"""
import collections.abc
import concurrent.futures
import contextlib
import csv
import fcntl
import io
import json
import math
import os
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax.common import get_base_dir
from nanochat_jax.model import cross_entropy_and_hits
from nanochat_jax.sharding import RULES, global_batch

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's, ~162 MB
BUNDLE_DIR_NAME = "eval_bundle"
OFFLINE_NAME = "CORE-offline"  # what scores from shared/data/eval_bundle.zip are called (EVAL_BUNDLE.md)
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
BATCH_TOKENS = 65_536  # tokens per batch (rows x padded length), over all devices
# what a compile is worth in batches of padding: seconds each at d20 on an H200, which runs ~10 batches a
# second; on a CPU, small models compile in about the time of a batch or two
COMPILE_BATCHES = {"cpu": 2}
COMPILE_BATCHES_ACCELERATOR = 32
# padded lengths: prefixes (the bulk of the work) in multiples of 128, then steps of a quarter or so;
# the rests (short: a choice, an answer) in powers of two
PREFIX_BUCKETS = [128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 6144, 8192]
SUFFIX_BUCKETS = [16, 32, 64, 128, 256, 512, 1024]

# -----------------------------------------------------------------------------
# The bundle: core.yaml, eval_meta_data.csv, eval_data/<category>/<task>.jsonl


class Bundle:
    """An eval bundle's files, read from a directory or straight out of its zip. `path` is a zip, or a
    directory holding core.yaml (or eval_bundle/core.yaml)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.zip = None
        if os.path.isfile(path):
            if not zipfile.is_zipfile(path):
                raise ValueError(f"{path} is neither a directory nor a zip file")
            self.zip = zipfile.ZipFile(path)
            names = [n for n in self.zip.namelist() if n == "core.yaml" or n.endswith("/core.yaml")]
            if not names:
                raise FileNotFoundError(f"{path} holds no core.yaml: not an eval bundle")
            self.root = min(names, key=lambda n: n.count("/"))[:-len("core.yaml")]
        else:
            found = [r for r in ("", BUNDLE_DIR_NAME) if os.path.isfile(os.path.join(path, r, "core.yaml"))]
            if not found:
                raise FileNotFoundError(f"no core.yaml in {path} or {os.path.join(path, BUNDLE_DIR_NAME)}: not an eval bundle")
            self.root = os.path.join(path, found[0])

    def read(self, name):
        if self.zip is not None:
            return self.zip.read(self.root + name).decode("utf-8")
        with open(os.path.join(self.root, name), encoding="utf-8") as f:
            return f.read()

    @property
    def name(self):
        """CORE-offline for the stand-in bundle (its core.yaml and eval_meta_data.csv say so), else CORE."""
        return OFFLINE_NAME if any(OFFLINE_NAME in self.read(f) for f in ("core.yaml", "eval_meta_data.csv")) else "CORE"


def _place_bundle(zip_path, out_dir):
    """Unzip a downloaded bundle next to out_dir and rename its eval_bundle/ into place (atomic)."""
    bundle = Bundle(zip_path)  # raises if the zip is damaged or no bundle
    if bundle.zip.testzip() is not None:
        raise ValueError(f"{zip_path}: a member fails its CRC check")
    tmp = tempfile.mkdtemp(prefix=".eval_bundle-", dir=os.path.dirname(out_dir))
    try:
        bundle.zip.extractall(tmp)
        os.rename(os.path.join(tmp, bundle.root), out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_bundle(url=EVAL_BUNDLE_URL, timeout=120):
    """$NANOCHAT_JAX_HOME/eval_bundle, downloaded from nanochat's URL the first time. A lock file keeps
    concurrent processes from fetching it twice: whoever comes second finds it in place."""
    out_dir = os.path.join(get_base_dir(), BUNDLE_DIR_NAME)
    if os.path.isfile(os.path.join(out_dir, "core.yaml")):
        return out_dir
    with open(out_dir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.isfile(os.path.join(out_dir, "core.yaml")):
            return out_dir
        tmp = out_dir + f".{os.getpid()}.zip.tmp"
        try:
            print(f"downloading the CORE eval bundle from {url}")
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
            _place_bundle(tmp, out_dir)
        except Exception as e:
            raise FileNotFoundError(
                f"no CORE eval bundle at {out_dir}, and downloading it failed ({type(e).__name__}: {e}). Either download "
                f"{url} and unzip it into {get_base_dir()} (so that {os.path.join(out_dir, 'core.yaml')} exists), "
                f"or pass --eval-bundle PATH: a bundle zip or its unpacked directory, e.g. the offline "
                f"stand-in shared/data/eval_bundle.zip") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return out_dir


@dataclass
class Task:
    label: str
    task_type: str  # one of TASK_TYPES
    num_fewshot: int
    delimiter: str
    baseline: float  # random baseline, percent
    data: list  # the items, shuffled with Random(1337) and cropped


def load_tasks(bundle, max_per_task=-1, labels=None):
    """The tasks of core.yaml in its order (or only `labels`), with their items as nanochat prepares them."""
    import yaml  # PyYAML: core.yaml is YAML
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    config = yaml.safe_load(bundle.read("core.yaml"))
    baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(io.StringIO(bundle.read("eval_meta_data.csv")))}
    tasks = []
    for entry in config["icl_tasks"]:
        if labels is not None and entry["label"] not in labels:
            continue
        if entry["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"core.yaml: task {entry['label']} has type {entry['icl_task_type']!r}, not one of {TASK_TYPES}")
        lines = io.StringIO(bundle.read("eval_data/" + entry["dataset_uri"]), newline=None)  # lines as a file gives them
        data = [json.loads(line) for line in lines if line.strip()]
        random.Random(1337).shuffle(data)  # the files are often ordered: a crop should still be a fair sample
        if max_per_task > 0:
            data = data[:max_per_task]
        tasks.append(Task(entry["label"], entry["icl_task_type"], entry["num_fewshot"][0],
                          entry.get("continuation_delimiter", " "), baselines[entry["label"]], data))
    if labels is not None and len(tasks) != len(set(labels)):
        missing = set(labels) - {t.label for t in tasks}
        raise ValueError(f"no task {sorted(missing)} in core.yaml")
    return tasks

# -----------------------------------------------------------------------------
# Prompts


class _AllBut(collections.abc.Sequence):
    """range(n) without `skip`: nanochat's few-shot pool [i for i in range(n) if i != idx], which
    random.sample reads only through len() and indexing, without building a list per item."""

    def __init__(self, n, skip):
        self.n, self.skip = n, skip

    def __len__(self):
        return self.n - 1

    def __getitem__(self, j):
        if not 0 <= j < self.n - 1:
            raise IndexError(j)
        return j + (j >= self.skip)


def fewshot_indices(idx, n, k):
    """The k few-shot items of item idx among n, as nanochat draws them. A crop to k items or fewer
    (where nanochat's sample() fails) takes all the others."""
    return random.Random(1234 + idx).sample(_AllBut(n, idx), min(k, n - 1)) if k > 0 else []


def render_prompts(task_type, item, delimiter, fewshot=()):
    """nanochat's prompt strings for one item: one per choice (multiple choice) or per context option
    (schema); for language modeling [without, with] the continuation. Few-shot examples come first,
    each with its answer and a blank line after it."""
    if task_type == "multiple_choice":
        shots = "".join(f"{e['query']}{delimiter}{e['choices'][e['gold']]}\n\n" for e in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{e['context_options'][e['gold']]}{delimiter}{e['continuation']}\n\n" for e in fewshot)
        return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{str(e['context']).strip()}{delimiter}{e['continuation']}\n\n" for e in fewshot)
        without = f"{shots}{str(item['context']).strip()}{delimiter}"
        # stripped: a trailing space would be absorbed into the continuation's first token in `with`,
        # and `without` would then not be a token prefix of it
        return [without.strip(), without + str(item["continuation"])]
    raise ValueError(f"unknown task type {task_type!r}")


def common_length(seqs, suffix=False):
    """Length of the token prefix (or suffix) that all sequences share."""
    seqs = [s[::-1] for s in seqs] if suffix else seqs
    lo, hi = min(seqs), max(seqs)  # lexicographic extremes: what they share, all share
    for i, (a, b) in enumerate(zip(lo, hi)):
        if a != b:
            return i
    return min(len(lo), len(hi))


def spans(task_type, tokens):
    """(sequences, [(start, end)]) of one item's token lists: each sequence's scored tokens are
    seq[start:end], predicted from positions start - 1 .. end - 2."""
    if task_type == "multiple_choice":
        start = common_length(tokens)
        return tokens, [(start, len(t)) for t in tokens]
    if task_type == "schema":
        n = common_length(tokens, suffix=True)
        return tokens, [(len(t) - n, len(t)) for t in tokens]
    without, with_ = tokens
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise ValueError("the prompt without the continuation does not tokenize to a prefix of the prompt with it")
    return [with_], [(len(without), len(with_))]

# -----------------------------------------------------------------------------
# Items -> trees: one shared prefix, then the sequences' rests packed one after another


@dataclass
class Tree:
    """One item's sequences as their shared prefix and, after it, each sequence's rest (seg says whose);
    span marks the scored tokens. Whole sequences (share_prefix=False) take one Tree each: what precedes
    the span as the prefix, the span as the rest."""
    key: int  # result slot of the first sequence: idx * rows + first sequence's number
    prefix: np.ndarray  # (P,) int32, starting with <|bos|>
    suffix: np.ndarray  # (S,) int32
    seg: np.ndarray  # (S,) which sequence each suffix token belongs to (0-based, contiguous, in order)
    off: np.ndarray  # (S,) index of each suffix token within its sequence's rest
    span: np.ndarray  # (S,) bool: a scored token


def make_trees(key, seqs, sp, share_prefix=True):
    """Tree(s) of one item's sequences and spans. A span starting at 0 (only possible when schema
    options tokenize identically) is empty, as nanochat's slice [-1:end-1] is."""
    sp = [(s, e) if s > 0 else (e, e) for s, e in sp]
    groups = [list(range(len(seqs)))] if share_prefix else [[r] for r in range(len(seqs))]
    trees = []
    for rows in groups:
        # the prefix ends where the first scored token of any sequence begins: every scored token is then
        # predicted either by the prefix's last state or by a state of its own sequence's rest
        n = min(common_length([seqs[r] for r in rows]), min(sp[r][0] for r in rows))
        parts = [np.asarray(seqs[r][n:], np.int32) for r in rows]
        off = [np.arange(len(p), dtype=np.int32) for p in parts]
        trees.append(Tree(key + rows[0], np.asarray(seqs[rows[0]][:n], np.int32), np.concatenate(parts),
                          np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)]), np.concatenate(off),
                          np.concatenate([(n + o >= sp[r][0]) & (n + o < sp[r][1]) for r, o in zip(rows, off)])))
    return trees


def n_sequences(task_type, item):
    """How many sequences an item is scored with: one per choice or context option; one for LM."""
    return 1 if task_type == "language_modeling" else len(item["choices" if task_type == "multiple_choice" else "context_options"])


def prepare(task, tokenizer, rows, share_prefix=True, process_index=0, process_count=1):
    """This process's items of a task (idx = process_index, + process_count, ...) as Trees."""
    n = len(task.data)
    mine = range(process_index, n, process_count)
    prompts, counts = [], []
    for idx in mine:
        shots = [task.data[i] for i in fewshot_indices(idx, n, task.num_fewshot)]
        p = render_prompts(task.task_type, task.data[idx], task.delimiter, shots)
        prompts += p
        counts.append(len(p))
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id(), num_threads=min(32, os.cpu_count() or 1))
    trees, i = [], 0
    for idx, c in zip(mine, counts):
        try:
            seqs, sp = spans(task.task_type, tokens[i:i + c])
        except ValueError as e:
            raise ValueError(f"{task.label} item {idx}: {e}") from None
        trees += make_trees(idx * rows, seqs, sp, share_prefix)
        i += c
    return trees


def bucket(n, sizes):
    for s in sizes:
        if n <= s:
            return s
    return -(-n // sizes[-1]) * sizes[-1]  # beyond the table: multiples of its largest


def plan(trees):
    """{(Tp, Ts): trees}: each tree goes to its prefix and suffix buckets (plain: the sequence before its
    span, and its span)."""
    shapes = {}
    for t in sorted(trees, key=lambda t: (len(t.prefix), len(t.suffix))):
        shapes.setdefault((bucket(len(t.prefix), PREFIX_BUCKETS), bucket(len(t.suffix), SUFFIX_BUCKETS)), []).append(t)
    return shapes


def batch_rows(shape, most, batch_tokens, row_multiple, compiled_rows=(), compile_tokens=0, work=(0.0, 1e9)):
    """(rows per batch over all processes, cost in padded tokens) for a shape (Tp, Ts) whose largest share on
    one process is `most` trees. Rows: batch_tokens // length, or fewer when there are fewer trees (a power of
    two, to keep the shapes few), a multiple of row_multiple; or more, where a program with more rows is
    already compiled (compiled_rows) and its padding costs less than compile_tokens. work: row_cost's
    (head, width)."""
    if most == 0:
        return 0, 0
    pc = jax.process_count()
    full = max(1, batch_tokens // sum(shape) // row_multiple) * row_multiple
    need = min(full, (1 << max(0, math.ceil(math.log2(-(-most * pc // row_multiple))))) * row_multiple)
    options = [(need, compile_tokens)] + [(B, 0) for B in compiled_rows if B >= need]
    return min(((-(-most // (B // pc)) * B * row_cost(shape, *work) + extra, B) for B, extra in options))[::-1]


def row_cost(shape, head=0.0, width=1e9):
    """A padded row's work in prefix tokens' worth of the blocks' matmuls: the prefix's causal attention
    adds Tp/12D a token; a suffix token also goes through lm_head (head = its FLOPs over the blocks') and
    attends over Tp + Ts keys."""
    Tp, Ts = shape
    return Tp * (1 + Tp / (12 * width)) + Ts * (1 + head + (Tp + Ts) / (6 * width))


def merge_shapes(counts, batch_tokens, row_multiple, compiled, compile_tokens, work=(0.0, 1e9)):
    """{(Tp, Ts): trees} -> {shape: [the shapes whose trees it takes]}. Two shapes are merged into one (the
    longer of each length) while that lowers the cost: padded tokens, plus compile_tokens for each program
    not compiled yet. compiled: {(Tp, Ts): rows of the programs compiled so far}, which join the merging as
    empty groups, so a task reuses an earlier task's programs where its padding costs less than a compile.
    A small group thus joins a larger neighbour rather than costing a compile and a mostly empty batch; a
    full-size run keeps nearly all of its shapes."""
    groups = {shape: [shape] for shape in counts}
    for shape in compiled:
        groups.setdefault(shape, [])
    size = lambda members: sum(counts[s] for m in members for s in groups[m])
    cost = lambda shape, n: batch_rows(shape, n, batch_tokens, row_multiple, compiled.get(shape, ()), compile_tokens, work)[1]
    while True:
        best = None
        keys = sorted(groups)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                if not groups[a] and not groups[b]:
                    continue
                target = (max(a[0], b[0]), max(a[1], b[1]))
                members = sorted({a, b, target} & set(groups))  # a group that already has the target shape joins too
                gain = sum(cost(m, size([m])) for m in members) - cost(target, size(members))
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, members, target)
        if best is None:
            break
        _, members, target = best
        groups[target] = sorted(sum((groups.pop(m) for m in members), []))
    return {shape: sources for shape, sources in sorted(groups.items()) if sources}


def pack(trees, Tp, Ts, B, pad_id):
    """Numpy arrays of one batch (B rows, padded with <|bos|> and key -1)."""
    prefix, suffix = np.full((B, Tp), pad_id, np.int32), np.full((B, Ts), pad_id, np.int32)
    plen, keys = np.ones(B, np.int32), np.full(B, -1, np.int32)
    seg, pos, span = np.full((B, Ts), -1, np.int32), np.zeros((B, Ts), np.int32), np.zeros((B, Ts), bool)
    for b, t in enumerate(trees):
        P, S = len(t.prefix), len(t.suffix)
        prefix[b, :P], plen[b], keys[b] = t.prefix, P, t.key
        suffix[b, :S], seg[b, :S], pos[b, :S], span[b, :S] = t.suffix, t.seg, P + t.off, t.span
    return dict(prefix=prefix, plen=plen, suffix=suffix, pos=pos, seg=seg, span=span, keys=keys)

# -----------------------------------------------------------------------------
# The device step: hidden states, then lm_head only where a token is scored


@partial(jax.jit, static_argnames=("graphdef", "rows", "share_prefix", "mesh"))
def score_batch(graphdef, params, batch, *, rows, share_prefix, mesh=None):
    """Per sequence of each row: the summed loss over its scored tokens, their count, and how many of
    them the argmax misses; (B, rows) each, replicated, with the rows' keys.
    share_prefix: the prefix once and the rests against its keys (GPT.features_shared_prefix); otherwise
    each row is one whole sequence (prefix + its scored rest) through GPT.features."""
    # under the mesh, so that the model's sharding constraints apply
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext():
        model = nnx.merge(graphdef, params)
        prefix, plen, suffix, pos, seg, span = (batch[k] for k in ("prefix", "plen", "suffix", "pos", "seg", "span"))
        B, Tp = prefix.shape
        Ts = suffix.shape[1]
        if share_prefix:
            hp, hs = model.features_shared_prefix(prefix, plen, suffix, pos, seg, scan_layers=True)
        else:  # the row's sequence is prefix[:plen] + suffix: lay it out whole, then split the states again
            cols = jnp.arange(Tp + Ts)[None, :]
            whole = jnp.where(cols < plen[:, None], jnp.pad(prefix, ((0, 0), (0, Ts))),
                              jnp.take_along_axis(jnp.pad(suffix, ((0, 0), (0, Tp))), jnp.maximum(cols - plen[:, None], 0), axis=1))
            h = model.features(whole)
            hp = h[:, :Tp]
            hs = jnp.take_along_axis(h, jnp.minimum(plen[:, None] + jnp.arange(Ts)[None, :], Tp + Ts - 1)[:, :, None], axis=1)
        last = jnp.take_along_axis(hp, (plen - 1)[:, None, None], axis=1)  # (B, 1, D): predicts each rest's first token
        before = jnp.concatenate([last, hs[:, :-1]], axis=1)  # the state before each suffix token...
        h = jnp.where((pos == plen[:, None])[:, :, None], last, before)  # ...or the prefix's, for a rest's first token
        targets = jnp.where(span, suffix, -1)
        loss, hit = cross_entropy_and_hits(h, model.lm_head.kernel[...], targets)  # (B, Ts) each
        mine = (seg[:, :, None] == jnp.arange(rows)[None, None, :]) & span[:, :, None]  # (B, Ts, rows)
        sums = jnp.where(mine, loss[:, :, None], 0.0).sum(axis=1)  # no matmul: exact fp32 sums
        counts = mine.sum(axis=1)
        misses = (mine & ~hit[:, :, None]).sum(axis=1)
        out = dict(sums=sums, counts=counts, misses=misses, keys=batch["keys"])
        if mesh is not None:  # every process gets every row back
            out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))
        return out

# -----------------------------------------------------------------------------
# The driver

ROWS = 16  # sequence slots per tree (CORE's most is 11 choices); fixed, so it never adds a compile
_SEEN_SHAPES = set()  # (graphdef, shape, ...) already compiled in this process, to count compiles
_PREPARED = {}  # the last run's trees, reused by the next run with the same inputs (periodic evals in training)


def _model_parts(model):
    """(graphdef, state) of a GPT, or of the (graphdef, state) that training and restore_run hold: the
    model or (model, optimizer)."""
    if isinstance(model, tuple):
        merged = nnx.merge(*model)
        model = merged[0] if isinstance(merged, tuple) else merged
    return nnx.split(model)


def _mesh_of(params):
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _agree(counts):
    """{(Tp, Ts): trees on this process} -> the most on any process, for every shape any process has: every
    process must run the same programs in the same order."""
    if jax.process_count() == 1:
        return counts
    from jax.experimental import multihost_utils
    table = np.zeros((4096, 3), np.int64)
    for i, (shape, n) in enumerate(sorted(counts.items())):
        table[i] = (*shape, n)
    merged = {}
    for Tp, Ts, n in multihost_utils.process_allgather(table).reshape(-1, 3):
        if n:
            merged[Tp, Ts] = max(merged.get((Tp, Ts), 0), int(n))
    return dict(sorted(merged.items()))


def decide(task, sums, counts, misses, rows=ROWS):
    """nanochat's decision for each item, from per-sequence loss sums, scored-token counts and argmax misses
    (slot idx * rows + sequence): [(correct, mean losses)]. Multiple choice and schema take the lowest mean
    (list.index(min(...)): an empty span's NaN mean is passed over unless it comes first, as in nanochat);
    language modeling is right iff the argmax is every token of the continuation (mean losses [mean])."""
    decisions = []
    for idx, item in enumerate(task.data):
        k = n_sequences(task.task_type, item)
        means = [float(sums[idx * rows + r]) / int(counts[idx * rows + r]) if counts[idx * rows + r] else math.nan for r in range(k)]
        if task.task_type == "language_modeling":
            decisions.append((bool(counts[idx * rows] > 0 and misses[idx * rows] == 0), means))
        else:
            decisions.append((means.index(min(means)) == item["gold"], means))
    return decisions


def centered_score(acc, baseline):
    """Accuracy rescaled so that chance (baseline, in percent) is 0 and perfect is 1."""
    return (acc - 0.01 * baseline) / (1.0 - 0.01 * baseline)


def evaluate_core(model, tokenizer, bundle=None, max_per_task=-1, batch_tokens=BATCH_TOKENS, mesh=None, share_prefix=True,
                  labels=None, compile_tokens=None, log=print):
    """CORE of a model: a GPT, or (graphdef, state) as training holds it; its compute dtype and attention
    kernel are the model's own (backend_settings() gives the backend's). bundle: a zip or directory
    (default: $NANOCHAT_JAX_HOME/eval_bundle, downloaded if missing). labels: only these tasks. The rest
    as evaluate_tasks. Returns evaluate_tasks' dict plus "core" (the mean centered score), "bundle" ("CORE",
    or "CORE-offline" for the stand-in) and "bundle_path"."""
    t_start = time.time()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle or default_bundle())
    tasks = load_tasks(bundle, max_per_task, labels)
    if jax.process_index() == 0:
        log(f"{bundle.name} ({bundle.path}): {len(tasks)} tasks, {sum(len(t.data) for t in tasks):,} examples, "
            f"{'shared prefixes' if share_prefix else 'whole sequences'}, {batch_tokens:,} tokens per batch")
    out = evaluate_tasks(model, tokenizer, tasks, batch_tokens, mesh, share_prefix, compile_tokens, log,
                         cache_key=(bundle.path, max_per_task, tuple(labels or ())))
    out.update(core=sum(out["centered"].values()) / len(out["centered"]), bundle=bundle.name, bundle_path=bundle.path,
               seconds=time.time() - t_start)
    if jax.process_index() == 0:
        log(f"{bundle.name}: {out['core']:.4f} ({len(tasks)} tasks, {sum(out['examples'].values()):,} examples, "
            f"{out['tokens'] / 1e6:.1f}M tokens padded to {out['padded_tokens'] / 1e6:.1f}M, {out['compiles']} programs "
            f"compiled in {out['compile_seconds']:.1f}s, {out['seconds']:.1f}s in all)")
    return out


def evaluate_tasks(model, tokenizer, tasks, batch_tokens=BATCH_TOKENS, mesh=None, share_prefix=True, compile_tokens=None,
                   log=print, details=False, cache_key=None):
    """Score Tasks (load_tasks' or hand-made). batch_tokens: rows x padded length per batch, over all
    devices. mesh: where the batches go (default: the params' mesh). share_prefix=False runs every
    sequence whole (for comparison). compile_tokens: what a compile is worth in padded tokens when shapes
    are merged (default COMPILE_BATCHES batches). Prints one line per task on process 0. details: also
    "details": {label: [(correct, mean losses of its sequences)]}. cache_key: keep the tokenized trees
    for the next call with the same key (training's periodic evals). Returns {"results": {label: accuracy},
    "centered", "timings" (seconds), "examples" (items), "compiles" (new programs), "compile_seconds",
    "tokens" (unpadded), "padded_tokens"}."""
    graphdef, params = _model_parts(model)
    mesh = mesh if mesh is not None else _mesh_of(params)
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    pi, pc = jax.process_index(), jax.process_count()
    say = log if pi == 0 else (lambda *a, **k: None)
    rows = max([ROWS] + [n_sequences(t.task_type, item) for t in tasks for item in t.data])
    c = nnx.merge(graphdef, params).config
    work = (c.vocab_size / (12 * c.n_layer * c.n_embd), c.n_embd)  # row_cost's: lm_head's FLOPs over the blocks', width
    row_multiple = math.lcm(pc, math.prod(mesh.shape[a] for a in RULES["batch"])) if mesh is not None else 1
    compile_cost = compile_tokens or COMPILE_BATCHES.get(jax.default_backend(), COMPILE_BATCHES_ACCELERATOR) * batch_tokens
    key = cache_key and (*cache_key, id(tokenizer), share_prefix, pi, pc)
    cached = _PREPARED.pop(key, None) if key else None
    out = {k: {} for k in ("results", "centered", "timings", "examples") + (("details",) if details else ())}
    out.update(compiles=0, compile_seconds=0.0, tokens=0, padded_tokens=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the next tasks are tokenized while the device works
        prepared = cached or [pool.submit(prepare, t, tokenizer, rows, share_prefix, pi, pc) for t in tasks]
        for k, task in enumerate(tasks):
            t0 = time.time()
            if not isinstance(prepared[k], list):
                prepared[k] = prepared[k].result()
            shapes = plan(prepared[k])
            agreed = _agree({shape: len(trees) for shape, trees in shapes.items()})
            compiled = {}  # {(Tp, Ts): rows} of the programs this process has compiled for this model and mode
            for g, Tp, Ts, B, *rest in _SEEN_SHAPES:
                if (g, *rest) == (graphdef, rows, share_prefix, mesh):
                    compiled.setdefault((Tp, Ts), set()).add(B)
            schedule = merge_shapes(agreed, batch_tokens, row_multiple, compiled, compile_cost, work)
            n = len(task.data)
            sums, counts, misses = np.zeros(n * rows + rows), np.zeros(n * rows + rows, np.int64), np.zeros(n * rows + rows, np.int64)
            seen = np.zeros(n, bool)

            def collect(result):
                result = jax.device_get(result)
                valid = result["keys"] >= 0
                slots = result["keys"][valid][:, None] + np.arange(rows)[None, :]  # a tree's sequences, or a whole sequence
                for total, name in ((sums, "sums"), (counts, "counts"), (misses, "misses")):
                    np.add.at(total, slots, result[name][valid])
                seen[result["keys"][valid] // rows] = True

            pending = []
            for (Tp, Ts), sources in schedule.items():
                most = sum(agreed[shape] for shape in sources)
                B = batch_rows((Tp, Ts), most, batch_tokens, row_multiple, compiled.get((Tp, Ts), ()), compile_cost, work)[0]
                local, trees = B // pc, [t for shape in sources for t in shapes.get(shape, [])]
                signature = (graphdef, Tp, Ts, B, rows, share_prefix, mesh)
                new = signature not in _SEEN_SHAPES
                out["compiles"] += new
                _SEEN_SHAPES.add(signature)
                for j in range(-(-most // local)):
                    arrays = pack(trees[j * local:(j + 1) * local], Tp, Ts, local, tokenizer.get_bos_token_id())
                    batch = {name: global_batch(a, mesh) for name, a in arrays.items()} if mesh is not None else arrays
                    out["padded_tokens"] += B * (Tp + Ts)
                    t_call = time.time()
                    pending.append(score_batch(graphdef, params, batch, rows=rows, share_prefix=share_prefix, mesh=mesh))
                    if new and j == 0:  # the first call of a new shape returns once it is compiled
                        out["compile_seconds"] += time.time() - t_call
                    if len(pending) > 2:  # keep the device queue full; the host catches up behind it
                        collect(pending.pop(0))
            for result in pending:
                collect(result)
            if not seen.all():
                raise RuntimeError(f"{task.label}: {int((~seen).sum())} of {n} items came back without a result")
            decisions = decide(task, sums, counts, misses, rows)
            acc = sum(correct for correct, _ in decisions) / n
            out["results"][task.label], out["centered"][task.label] = acc, centered_score(acc, task.baseline)
            out["timings"][task.label], out["examples"][task.label] = time.time() - t0, n
            out["tokens"] += sum(len(t.prefix) + len(t.suffix) for t in prepared[k]) * pc  # about, over processes
            if details:
                out["details"][task.label] = decisions
            say(f"{task.label:<35} accuracy {acc:.4f} | centered {out['centered'][task.label]:+.4f} | {n:>6,} examples | "
                f"{len(schedule)} shapes | {out['timings'][task.label]:6.2f}s")
    if key:
        _PREPARED.clear()
        _PREPARED[key] = prepared
    return out

# -----------------------------------------------------------------------------
# Output: nanochat's CSV, and the report's table


def write_csv(path, out):
    """nanochat's base_eval CSV (Task, Accuracy, Centered; then CORE), written whole then renamed."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n"]
    lines += [f"{label:<35}, {acc:<10.6f}, {out['centered'][label]:<10.6f}\n" for label, acc in out["results"].items()]
    lines.append(f"{'CORE':<35}, {'':<10}, {out['core']:<10.6f}\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.writelines(lines)
    os.replace(tmp, path)
    return path


def markdown_table(out):
    lines = ["| Task | Accuracy | Centered | Examples | Seconds |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {acc:.4f} | {out['centered'][label]:.4f} | {out['examples'][label]:,} | {out['timings'][label]:.1f} |"
              for label, acc in out["results"].items()]
    return "\n".join(lines)
