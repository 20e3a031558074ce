"""run_speedrun.py: the README's main command."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "..", "shared", "data", "eval_bundle.zip")  # CORE-offline; a user's machine has none


def run(*args, home, **env_vars):
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), **env_vars)
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


def test_rehearsal_runs_every_stage_for_a_few_steps_offline_in_its_own_home(tmp_path):
    result = run("--tier=d20", "--rehearsal", "--rehearsal-steps", "5", "--data-dir", "/data/shards", "--tasks-dir", "/data/tasks",
                 "--dry-run", home=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "-m pipelines.base_train --tier d20 --num-iterations 5 --eval-every -1" in out  # d20's shapes, 5 steps
    assert "-m pipelines.mid_train --mixture offline --num-iterations 5" in out
    assert "-m pipelines.chat_sft --mixture offline --num-iterations 10" in out
    assert "-m pipelines.chat_rl --task GSM8K --num-iterations 5" in out  # RL too, on the local GSM8K
    assert "-m pipelines.chat_eval --source rl --max-problems 24" in out
    assert (tmp_path / "rehearsal_d20").is_dir()  # its own home: a real run in this home skips none of its stages
    without_tasks = run("--tier=d20", "--rehearsal", "--dry-run", home=tmp_path).stdout
    assert "-m nanochat_jax.dataset --num-shards 4" in without_tasks and "--task SpellingBee" in without_tasks


def test_jax_num_processes_runs_the_sharded_stages_as_a_group_of_local_processes(tmp_path):
    out = run("--tier=d20", "--dry-run", home=tmp_path, JAX_NUM_PROCESSES="2").stdout
    for stage in ("base_train", "base_loss", "base_eval", "mid_train", "chat_sft"):
        assert f"=== {stage} (2 processes): " in out
    for stage in ("tok_train", "chat_eval_mid"):  # no accelerator, or decoding on one device: one process
        assert f"=== {stage}: " in out
    refused = run("--tier=d20", "--dry-run", home=tmp_path, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    assert refused.returncode != 0 and "starts the processes of this host itself" in refused.stderr


def kill_when(cmd, env, ready, timeout=1500):
    """Start cmd in its own process group and SIGKILL the whole group once ready() holds (a power cut)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_tiny_tier_runs_end_to_end_offline_and_resumes_by_skipping(tmp_path, monkeypatch):
    """The README's main command: killed in the middle of midtraining, it is run again and resumes that stage
    from its checkpoint; then every stage has run, val bpb clearly falls, the report card is written; run a third
    time, every stage is found done and skipped. With the shared CORE-offline bundle base_eval runs too; without
    one, the offline tier leaves it out and says why."""
    monkeypatch.chdir(tmp_path)
    bundle = ["--eval-bundle", BUNDLE] if os.path.isfile(BUNDLE) else []
    mid_dir = tmp_path / "home" / "mid_checkpoints" / "d4"
    kill_when([sys.executable, "run_speedrun.py", "--tier=tiny", *bundle], dict(os.environ, NANOCHAT_JAX_HOME=str(tmp_path / "home")),
              ready=lambda: (mid_dir / "50").is_dir())  # orbax renames a checkpoint into place once it is whole
    assert not (tmp_path / "home" / "report" / "midtraining.md").exists()
    result = run("--tier=tiny", *bundle, home=tmp_path / "home")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all stages done" in result.stdout
    assert "=== base_train: already done" in result.stdout and "--resume" in result.stdout.split("=== mid_train: ")[1].split("\n")[0]
    assert "resumed from step 50" in result.stdout.split("=== mid_train: ")[1].split("=== mid_train done")[0]
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
    assert [r["step"] for r in mid if "loss" in r] == sorted({r["step"] for r in mid if "loss" in r})  # no step twice
    mid_bpb = [r["val_bpb"] for r in mid if "val_bpb" in r]
    assert mid_bpb[-1] < mid_bpb[0], mid_bpb  # the chat mixture is learned
    sft = [json.loads(line) for line in open(tmp_path / "home" / "sft_checkpoints" / "d4" / "metrics.jsonl")]
    assert [r["val_loss"] for r in sft if "val_loss" in r][-1] < [r["val_loss"] for r in sft if "val_loss" in r][0]
    sft_eval = open(tmp_path / "home" / "report" / "chat-evaluation-sft.md").read()
    assert "Stops within 128 tokens (50 held-out prompts)" in sft_eval and "Names itself (20 held-out questions)" in sft_eval
    assert (tmp_path / "home" / "report" / "chat_rl_curves.png").is_file() and "| RL |" in report.split("## Summary")[1]
    assert "chitchat train: 500" in report and "identity conversations: 300" in report  # the sources, with their rows
    times = json.load(open(tmp_path / "home" / "report" / "stage_times.json"))
    assert {"tok_train", "base_train", "mid_train", "chat_sft", "chat_rl", "chat_eval_rl"} <= set(times)
    assert "## Speedrun" in report and "| mid_train |" in report and "estimated cost" in report
    assert "Peak memory (GiB): -" in report  # every stage records it; a CPU has no memory stats to give
    if bundle:
        assert "## Base model evaluation" in report and "CORE-offline" in report
        assert "| CORE |" in report  # the summary table's row
    else:
        assert "=== base_eval: left out: no CORE eval bundle" in result.stdout
    again = run("--tier=tiny", *bundle, home=tmp_path / "home")
    assert again.returncode == 0 and again.stdout.count("already done, skipping") == 11 + 2 * bool(bundle)  # + eval_bundle, base_eval
