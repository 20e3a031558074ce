"""run_speedrun.py: the README's main command."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "..", "shared", "data", "eval_bundle.zip")  # CORE-offline; a user's machine has none


def run(*args, home):
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home))
    return subprocess.run([sys.executable, "run_speedrun.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def test_dry_run_shows_each_stage_with_its_tier_flags(tmp_path):
    result = run("--tier=d20", "--dry-run", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "-m nanochat_jax.dataset --num-shards 240" in result.stdout
    assert "-m pipelines.tok_train --vocab-size 65536 --max-chars 2000000000" in result.stdout
    assert "-m pipelines.base_train --tier d20" in result.stdout and "-m pipelines.base_loss --tag d20" in result.stdout
    result = run("--tier=d20", "--data-dir", "/data/shards", "--dry-run", home=tmp_path)
    assert "nanochat_jax.dataset" not in result.stdout  # given shards: nothing to download
    assert "-m pipelines.base_train --tier d20 --data-dir /data/shards" in result.stdout


@pytest.mark.slow
def test_tiny_tier_runs_end_to_end_offline_and_resumes_by_skipping(tmp_path, monkeypatch):
    """The README's main command: every stage runs, val bpb clearly falls, the report card is written;
    run again, every stage is found done and skipped. With the shared CORE-offline bundle base_eval runs
    too; without one, the offline tier leaves it out and says why."""
    monkeypatch.chdir(tmp_path)
    bundle = ["--eval-bundle", BUNDLE] if os.path.isfile(BUNDLE) else []
    result = run("--tier=tiny", *bundle, home=tmp_path / "home")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all stages done" in result.stdout
    rows = [json.loads(line) for line in open(tmp_path / "home" / "base_checkpoints" / "d4" / "metrics.jsonl")]
    bpb = [r["val_bpb"] for r in rows if "val_bpb" in r]
    assert bpb[-1] < 0.7 * bpb[0], bpb
    report = open(tmp_path / "home" / "report" / "report.md").read()
    assert "Run started:" in report  # the header: a fresh run resets the report even with inputs given
    for section in ("## Tokenizer training", "## Tokenizer evaluation", "## Base model training", "## Base model loss",
                    "## Midtraining", "## Chat evaluation mid", "## Chat SFT", "## Chat evaluation sft", "## Chat RL",
                    "## Chat evaluation rl", "## Summary"):
        assert section in report
    mid = [json.loads(line) for line in open(tmp_path / "home" / "mid_checkpoints" / "d4" / "metrics.jsonl")]
    mid_bpb = [r["val_bpb"] for r in mid if "val_bpb" in r]
    assert mid_bpb[-1] < mid_bpb[0], mid_bpb  # the chat mixture is learned
    sft = [json.loads(line) for line in open(tmp_path / "home" / "sft_checkpoints" / "d4" / "metrics.jsonl")]
    assert [r["val_loss"] for r in sft if "val_loss" in r][-1] < [r["val_loss"] for r in sft if "val_loss" in r][0]
    sft_eval = open(tmp_path / "home" / "report" / "chat-evaluation-sft.md").read()
    assert "Stops within 128 tokens (50 held-out prompts)" in sft_eval and "Names itself (20 held-out questions)" in sft_eval
    assert (tmp_path / "home" / "report" / "chat_rl_curves.png").is_file() and "| RL |" in report.split("## Summary")[1]
    assert "chitchat train: 500" in report and "identity conversations: 300" in report  # the sources, with their rows
    if bundle:
        assert "## Base model evaluation" in report and "CORE-offline" in report
        assert "| CORE |" in report  # the summary table's row
    else:
        assert "=== base_eval: left out: no CORE eval bundle" in result.stdout
    again = run("--tier=tiny", *bundle, home=tmp_path / "home")
    assert again.returncode == 0 and again.stdout.count("already done, skipping") == 11 + 2 * bool(bundle)  # + eval_bundle, base_eval
