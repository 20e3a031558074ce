"""The midtraining and SFT mixtures: nanochat's sources and sizes when the hub splits are there, the offline
mixture otherwise (identity, spelling, chitchat, plus whatever a tasks directory holds), always in the same
shuffled order, with the rows of every source listed for the report card."""
import gzip
import json

import huggingface_hub.constants
import pytest

from nanochat_jax.mixtures import IDENTITY_COPIES, identity, mixture
from nanochat_jax.tasks.common import TaskDataError

WORDS = ["apple", "banana", "cherry", "strawberry", "kiwi", "lemon", "mango", "pear"]


def write_jsonl_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def chat(i):
    return {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"hi {i}"}]}


def mc(i):
    return {"question": f"q{i}?", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": i % 4}


def arc(i):
    return {"id": str(i), "question": f"q{i}?", "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")}, "answerKey": "B"}


def gsm(i):
    return {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No hub: huggingface_hub's own offline mode, and an empty cache."""
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NANOCHAT_JAX_TASKS_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def word_list(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return str(path)


@pytest.fixture
def full_tasks_dir(tmp_path):
    """Every hub split nanochat's mixtures read, small, in the hub datasets' field layouts."""
    d = tmp_path / "tasks"
    d.mkdir()
    write_jsonl_gz(d / "smoltalk_train.jsonl.gz", [chat(i) for i in range(50)])
    write_jsonl_gz(d / "smoltalk_test.jsonl.gz", [chat(i) for i in range(20)])
    write_jsonl_gz(d / "mmlu_auxiliary_train.jsonl.gz", [{"train": mc(i)} for i in range(30)])
    write_jsonl_gz(d / "mmlu_test.jsonl.gz", [mc(i) for i in range(40)])
    write_jsonl_gz(d / "gsm8k_train.jsonl.gz", [gsm(i) for i in range(25)])
    write_jsonl_gz(d / "gsm8k_test.jsonl.gz", [gsm(i) for i in range(10)])
    write_jsonl_gz(d / "arc_easy_train.jsonl.gz", [arc(i) for i in range(12)])
    write_jsonl_gz(d / "arc_challenge_train.jsonl.gz", [arc(i) for i in range(6)])
    return str(d)


def test_nanochat_mid_mixture_has_its_sources_in_its_proportions(full_tasks_dir, word_list, offline_hub):
    mix = mixture("mid", "train", source="nanochat", tasks_dir=full_tasks_dir, word_list=word_list)
    assert mix.kind == "nanochat"
    n_identity = len(identity())
    assert mix.sources == [("SmolTalk train", 50), ("MMLU auxiliary_train", 30), ("GSM8K train", 25),
                           ("identity conversations", n_identity), ("identity conversations", n_identity),  # x2, as nanochat
                           ("SimpleSpelling", 200_000), ("SpellingBee", 80_000)]
    assert len(mix.task) == sum(rows for _, rows in mix.sources)
    val = mixture("mid", "val", source="nanochat", tasks_dir=full_tasks_dir, word_list=word_list)
    assert val.sources == [("SmolTalk test", 20), ("MMLU test[:5200]", 40), ("GSM8K test[:420]", 10)]


def test_nanochat_sft_mixture(full_tasks_dir, word_list, offline_hub):
    mix = mixture("sft", "train", source="nanochat", tasks_dir=full_tasks_dir, word_list=word_list)
    names = [name for name, _ in mix.sources]
    assert names == ["ARC-Easy train", "ARC-Challenge train", "GSM8K train", "SmolTalk train[:10K]", "identity conversations",
                     "SimpleSpelling", "SpellingBee"]
    assert IDENTITY_COPIES["sft"] == 1 and mix.describe().startswith("nanochat: ARC-Easy train 12, ")


def test_the_mixture_order_is_deterministic_and_mixes_every_source(full_tasks_dir, word_list, offline_hub):
    a = mixture("sft", "train", source="nanochat", tasks_dir=full_tasks_dir, word_list=word_list)
    b = mixture("sft", "train", source="nanochat", tasks_dir=full_tasks_dir, word_list=word_list)
    first = [a.task[i] for i in range(60)]
    assert first == [b.task[i] for i in range(60)]
    kinds = {("letters" in c) + 2 * ("Spell" in str(c["messages"][0]["content"])) for c in first}
    assert len(kinds) >= 2  # shuffled together (random.Random(42)), not one source after the other


def test_offline_uses_identity_spelling_chitchat_and_what_the_tasks_dir_holds(tmp_path, offline_hub):
    d = tmp_path / "some_tasks"
    d.mkdir()
    write_jsonl_gz(d / "gsm8k_train.jsonl.gz", [gsm(i) for i in range(25)])  # only this one of nanochat's splits
    mix = mixture("mid", "train", source="offline", tasks_dir=str(d))
    assert mix.kind == "offline"
    assert [name for name, _ in mix.sources] == ["GSM8K train", "identity conversations", "identity conversations",
                                                 "SimpleSpelling", "SpellingBee", "chitchat train"]
    n_identity = len(identity())
    # chitchat (32,939 pieces, about an eighth of a SmolTalk row each) stands in for SmolTalk (~460K rows): the
    # spelling tasks keep nanochat's share of its text, 200K and 80K scaled by 32,939 / (8 x 460,000)
    assert [rows for _, rows in mix.sources] == [25, n_identity, n_identity, 1_790, 716, 32_939]
    sft = mixture("sft", "train", source="offline", tasks_dir=str(d))
    assert sft.sources[1:] == [("identity conversations", n_identity), ("SimpleSpelling", 38), ("SpellingBee", 38),
                               ("chitchat train", 10_000)]  # as SmolTalk[:10K], and nanochat's 300 + 300 scaled by 1/8
    val = mixture("mid", "val", source="offline", tasks_dir=str(d))
    assert [name for name, _ in val.sources] == ["chitchat test"]


def test_a_fraction_keeps_the_head_of_every_source_but_identity_in_proportion(offline_hub):
    full = mixture("mid", "train", source="offline")
    small = mixture("mid", "train", source="offline", fraction=0.01)
    assert [rows for _, rows in small.sources] == [rows if name == "identity conversations" else -(-rows // 100)
                                                   for name, rows in full.sources]  # ceil(rows / 100)
    assert [small.task.tasks[-1][i] for i in range(5)] == [full.task.tasks[-1][i] for i in range(5)]  # the same first rows
    with pytest.raises(ValueError, match="fraction 0 is not in"):
        mixture("mid", "train", source="offline", fraction=0)


def test_auto_falls_back_to_offline_and_says_what_was_missing(offline_hub):
    said = []
    mix = mixture("sft", "train", source="auto", word_list=None, fraction=0.01, log=said.append)
    assert mix.kind == "offline" and "chitchat train" in dict(mix.sources)
    assert "ARC ARC-Easy train" in said[0]  # the first source that could not be had


def test_nanochat_without_its_data_is_an_error_that_says_how_to_get_it(word_list, offline_hub):
    with pytest.raises(TaskDataError, match="--tasks-dir"):
        mixture("mid", "train", source="nanochat", word_list=word_list)


def test_bad_stage_or_source_is_rejected():
    with pytest.raises(ValueError, match="stage mid|sft"):
        mixture("rl", "train")
    with pytest.raises(ValueError, match="source"):
        mixture("mid", "train", source="hub")
