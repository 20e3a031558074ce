"""`python -m nanochat_jax.parity` on every golden file of PyTorch nanochat, as a user runs it.
Skips when ../shared/golden is absent (a user's machine has no ../shared)."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = sorted(glob.glob(os.path.join(REPO, "..", "shared", "golden", "*.npz")))
pytestmark = pytest.mark.skipif(not GOLDEN, reason="no ../shared/golden beside the checkout")


def parity(*args):
    return subprocess.run([sys.executable, "-m", "nanochat_jax.parity", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("mesh", [None, "data=2,fsdp=2,tensor=2"])
def test_every_golden_file_passes(mesh):
    result = parity(*GOLDEN, *(["--mesh", mesh] if mesh else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout and "FAIL" not in result.stdout
    if mesh:
        assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in result.stdout


def test_a_wrong_reference_fails_loudly(tmp_path):
    """The command must really compare: nudge the reference logits by 0.01 and it has to exit non-zero."""
    forward = next(p for p in GOLDEN if "forward" in os.path.basename(p))
    data = dict(np.load(forward, allow_pickle=False))
    data["logits"] = data["logits"] + 0.01
    np.savez(tmp_path / "nudged.npz", **data)
    result = parity(str(tmp_path / "nudged.npz"))
    assert result.returncode == 1
    assert "FAIL logits max abs" in result.stdout and "1 check(s) FAILED" in result.stdout
