"""run_speedrun.py: the README's main command."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, home):
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home))
    return subprocess.run([sys.executable, "run_speedrun.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def test_dry_run_shows_each_stage_with_its_tier_flags(tmp_path):
    result = run("--tier=d20", "--data-dir", "/data/shards", "--dry-run", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "-m pipelines.tok_train --vocab-size 65536 --max-chars 2000000000 --data-dir /data/shards" in result.stdout
    assert "-m pipelines.tok_eval --data-dir /data/shards" in result.stdout


@pytest.mark.slow
def test_tiny_tier_runs_end_to_end_offline(tmp_path):
    result = run("--tier=tiny", home=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all stages done" in result.stdout
    assert os.path.isfile(tmp_path / "tokenizer" / "tokenizer.json")


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    command = "pip install -e '.[test]' && python -m pytest"
    assert f"\n{command}\n" in readme and f"\n{command}\n" in ci
