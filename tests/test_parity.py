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


def test_a_greedy_path_that_stops_early(tmp_path):
    """A generate file whose greedy path reaches <|bos|> after 5 tokens: the engine yields the stop token
    and ends there, as nanochat's Engine.generate does, while the naive reference runs all n_new steps.
    Made from random weights by swapping the ids of <|bos|> and the 6th greedy token (in the embedding
    and lm_head alike), which moves the greedy path onto <|bos|> without changing anything else."""
    import json

    from flax import nnx

    from conftest import randomize
    from nanochat_jax.convert import export_nanochat_weights, load_nanochat_weights
    from nanochat_jax.engine import greedy_naive
    from nanochat_jax.model import GPT, GPTConfig

    config = dict(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    V, n_new, bos = config["vocab_size"], 16, config["vocab_size"] - 9
    model = randomize(GPT(GPTConfig(**config), rngs=nnx.Rngs(0)))
    prompt = list(range(10, 26))
    path = greedy_naive(model, [prompt], n_new)[0]
    k = next(k for k in range(5, n_new) if path[k] not in path[:k] + prompt + [bos])  # the first fresh token from the 6th on
    swap = np.arange(V)
    swap[[path[k], bos]] = swap[[bos, path[k]]]
    weights = {name: w[swap] if name in ("transformer.wte.weight", "lm_head.weight") else w
               for name, w in export_nanochat_weights(model).items()}
    load_nanochat_weights(model, weights)
    naive = greedy_naive(model, [prompt], n_new)[0]
    assert naive[k] == bos and bos not in naive[:k]
    meta = {"kind": "generate", "config": config}
    np.savez(tmp_path / "stops.npz", meta_json=np.frombuffer(json.dumps(meta).encode(), np.uint8), prompt=np.array(prompt),
             generated=np.array(naive[:k + 1]), naive=np.array(naive), **{f"w/{n}": w for n, w in weights.items()})
    result = parity(str(tmp_path / "stops.npz"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
