import importlib.metadata
import json
import math
import re

import pytest

from nanochat_jax.report import get_report, plot_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def report(tmp_path, monkeypatch):
    """A report under a throwaway home, generated from a separate cwd (like a run launched from the repo)."""
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    r = get_report()
    r.reset()
    return r


def write_metrics(path, steps=300, val_every=50):
    """Synthetic metrics.jsonl: a noisy decaying loss every step, val_bpb on every val_every-th step."""
    with open(path, "w") as f:
        for step in range(steps):
            row = {"step": step, "loss": 3 + 8 * math.exp(-step / 40) + 0.3 * math.sin(step * 1.7), "lr": 0.02}
            if step % val_every == 0 or step == steps - 1:
                row["val_bpb"] = 1.0 + 2.5 * math.exp(-step / 60)
            f.write(json.dumps(row) + "\n")


def test_reset_header_names_commit_and_versions(report):
    """Two report cards are only comparable if each says which code and which library versions made it."""
    header = open(f"{report.dir}/header.md").read()
    assert re.search(r"^- commit: [0-9a-f]{7,}( \(dirty\))?$", header, flags=re.M), header
    assert f"- jax: {importlib.metadata.version('jax')}" in header
    assert f"- flax: {importlib.metadata.version('flax')}" in header
    assert re.search(r"^- JAX devices: \d+ x ", header, flags=re.M)
    assert re.search(r"^- files: [1-9]", header, flags=re.M)  # this repo's own tracked sources
    assert "Run started: " in header


def test_generate_orders_sections_and_summarizes_metrics(report):
    """Stages finish out of order on a resumed run; the card must still read in pipeline order and its
    summary must carry exactly the numbers the stages logged, in the right column."""
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.3876, "GSM8K": 0.0455, "ChatCORE": 0.0884}])
    report.log("Base model evaluation", [{"CORE": 0.2219}])
    report.log("Notes", ["a free-form section nobody planned for"])
    report.log("Chat evaluation rl", [{"GSM8K": 0.0758}])
    report.log("Base model training", [{"depth": 20, "num_params": 560_988_160}, {"min_val_bpb": 0.8123}, "done."])
    report.log("Chat evaluation mid", [{"ARC-Easy": 0.3561, "GSM8K": 0.025, "ChatCORE": 0.073}])
    report.log("Tokenizer training", [{"vocab_size": 65536, "train time (s)": 1.2}])
    path = report.generate()
    text = open(path).read()

    titles = re.findall(r"^## (.*)$", text, flags=re.M)
    assert titles == ["Tokenizer training", "Base model training", "Base model evaluation", "Chat evaluation mid",
                      "Chat evaluation sft", "Chat evaluation rl", "Notes", "Summary"]
    assert "- num_params: 560,988,160" in text  # big ints get commas
    assert "- vocab_size: 65,536" in text
    assert "- train time (s): 1.2000" in text
    assert "a free-form section nobody planned for" in text
    summary = text.split("## Summary")[1]
    assert "| Metric | BASE | MID | SFT | RL |" in summary
    assert "| min_val_bpb | 0.8123 | - | - | - |" in summary
    assert "| CORE | 0.2219 | - | - | - |" in summary
    assert "| ARC-Easy | - | 0.3561 | 0.3876 | - |" in summary
    assert "| GSM8K | - | 0.0250 | 0.0455 | 0.0758 |" in summary
    assert "| ChatCORE | - | 0.0730 | 0.0884 | - |" in summary
    assert "MMLU" not in summary  # never logged: no empty row
    assert "depth" not in summary  # run flags are not metrics
    assert re.search(r"Total wall clock time: \d+h\d\dm\d\ds", summary)


def test_log_overwrites_section(report):
    """Rerunning a stage replaces its section instead of appending a second copy."""
    report.log("Base model evaluation", [{"CORE": 0.1}])
    report.log("Base model evaluation", [{"CORE": 0.2219}])
    text = open(report.generate()).read()
    assert text.count("## Base model evaluation") == 1
    assert "| CORE | 0.2219 | - | - | - |" in text


def test_plot_metrics_writes_png(tmp_path):
    """The curves PNG is a real image, not an empty canvas, even with val_bpb on only a few steps."""
    write_metrics(tmp_path / "metrics.jsonl")
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    data = open(out, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000


def test_generate_copies_report_and_curves_to_cwd(report, tmp_path):
    """The training-curve link in report.md is relative, so the PNG must land next to each copy of it."""
    write_metrics(tmp_path / "metrics.jsonl")
    plot_metrics(tmp_path / "metrics.jsonl", f"{report.dir}/base_train_curves.png")
    report.log("Base model training", [{"min_val_bpb": 1.0}, "![training curves](base_train_curves.png)"])
    report.generate()
    cwd = tmp_path / "cwd"
    assert "![training curves](base_train_curves.png)" in (cwd / "report.md").read_text()
    assert (cwd / "base_train_curves.png").read_bytes()[:8] == PNG_MAGIC
