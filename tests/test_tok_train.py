"""The tokenizer stages as a user runs them: python -m pipelines.tok_train / tok_eval / tok_bench."""
import os
import subprocess
import sys

import pytest

from nanochat_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, home):
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home with a tokenizer trained by the real stage on 1M characters of the embedded corpus."""
    home = tmp_path_factory.mktemp("home")
    result = run("-m", "pipelines.tok_train", "--vocab-size", "1000", "--max-chars", "1000000", home=home)
    assert result.returncode == 0, result.stderr
    (home / "tok_train.log").write_text(result.stdout)
    return home


def test_tok_train_saves_a_loadable_tokenizer_and_reports_speed(home):
    tok = Tokenizer.from_directory(os.path.join(home, "tokenizer"))
    assert tok.get_vocab_size() == 1000 and tok.get_bos_token_id() == 991
    log = (home / "tok_train.log").read_text()
    assert "M chars/s" in log
    trained_chars = int(log.split("trained on ")[1].split(" characters")[0].replace(",", ""))
    assert 1_000_000 <= trained_chars < 1_000_000 + 10_000  # stops within one doc_cap of --max-chars
    text = "The Congress shall have power to lay and collect taxes."
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text) / 2


def test_tok_train_names_a_missing_data_dir(tmp_path):
    result = run("-m", "pipelines.tok_train", "--vocab-size", "300", "--data-dir", str(tmp_path / "nope"), home=tmp_path)
    assert result.returncode != 0
    assert "nope does not exist" in result.stderr


def test_tok_eval_prints_the_compression_table(home):
    result = run("-m", "pipelines.tok_eval", "--download-timeout", "5", home=home)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    for name in ["news", "korean", "code", "math", "science", "train-shard", "val-shard"]:
        assert name in rows, result.stdout
    assert float(rows["news"][2]) > 2.0 and float(rows["train-shard"][2]) > 2.0  # bytes/token: merges compress English


def test_tok_bench_checks_merges_and_prints_the_ratio(home):
    pytest.importorskip("rustbpe")
    result = run("-m", "pipelines.tok_bench", "--max-chars", "300000", "--vocab-size", "2000", "--repeats", "1", home=home)
    assert result.returncode == 0, result.stderr
    assert "merges identical: 1,991 ranks" in result.stdout
    assert "speed ratio (rustbpe time / ours):" in result.stdout
