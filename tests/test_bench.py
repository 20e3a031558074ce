"""`python -m nanochat_jax.bench train` runs end to end (a tiny CPU smoke run; real figures come from GPUs)."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_benchmark_prints_its_figures():
    result = subprocess.run([sys.executable, "-m", "nanochat_jax.bench", "train", "--depth", "2", "--device-batch-size", "2",
                             "--seq-len", "64", "--vocab-size", "512", "--steps", "2", "--warmup", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert re.search(r"compile [\d.]+s \| step median [\d.]+ ms .* tok/s \| MFU [\d.]+% \| peak mem", line), line
