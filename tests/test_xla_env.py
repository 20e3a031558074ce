"""The launcher's XLA settings: every flag it adds must parse on the installed jaxlib (an unknown flag
aborts the process), a user's own setting wins, and compiled programs land in the persistent cache."""
import json
import os
import subprocess
import sys

SCRIPT = """
import json, os, sys
from nanochat_jax import xla_env
applied = xla_env.configure(sys.argv[1])
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(float(jax.jit(lambda x: (x @ x.T).sum())(jnp.ones((64, 64)))))
print(json.dumps({"applied": applied, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                  "fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}))
"""


def run(tmp_path, **settings):
    """configure() in a fresh process with only `settings` of the variables it touches; its report."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")}
    env.update(JAX_PLATFORMS="cpu", **settings)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    value, report = out.stdout.strip().splitlines()[-2:]
    assert float(value) == 64.0 ** 3
    return json.loads(report)


def test_flags_parse_and_the_compile_cache_fills(tmp_path):
    report = run(tmp_path)
    assert "--xla_gpu_enable_triton_gemm=false" in report["XLA_FLAGS"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in report["XLA_FLAGS"]
    assert report["fraction"] == "0.92"
    assert report["applied"]["jax_compilation_cache_dir"] == str(tmp_path / "cache")
    assert os.listdir(tmp_path / "cache"), "nothing was written to the compilation cache"


def test_the_users_settings_win(tmp_path):
    report = run(tmp_path, XLA_FLAGS="--xla_gpu_enable_triton_gemm=true", XLA_PYTHON_CLIENT_MEM_FRACTION="0.5")
    assert "--xla_gpu_enable_triton_gemm=true" in report["XLA_FLAGS"]
    assert "--xla_gpu_enable_triton_gemm=false" not in report["XLA_FLAGS"]
    assert report["fraction"] == "0.5" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in report["applied"]
