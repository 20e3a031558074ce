"""`python -m nanochat_jax.bench` runs end to end (tiny CPU smoke runs; real figures come from the benchmarks)."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args):
    result = subprocess.run([sys.executable, "-m", "nanochat_jax.bench", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_benchmark_prints_its_figures():
    out = bench("train", "--depth", "2", "--device-batch-size", "2", "--seq-len", "64", "--vocab-size", "512", "--steps", "2", "--warmup", "1")
    line = out.strip().splitlines()[-1]
    assert re.search(r"compile [\d.]+s \| step median [\d.]+ ms .* tok/s \| MFU [\d.]+% \| peak mem", line), line


def test_kernels_benchmark_refuses_without_a_gpu_and_runs_in_the_interpreter():
    args = ("kernels", "--depth", "2", "--device-batch-size", "1", "--seq-len", "256", "--vocab-size", "512", "--steps", "1")
    import jax
    if jax.default_backend() != "gpu" and "NANOCHAT_JAX_PALLAS_INTERPRET" not in os.environ:
        refused = subprocess.run([sys.executable, "-m", "nanochat_jax.bench", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0 and "only on NVIDIA GPUs" in refused.stderr
    env = dict(os.environ, NANOCHAT_JAX_PALLAS_INTERPRET="1")  # the same kernels, interpreted: a smoke run
    result = subprocess.run([sys.executable, "-m", "nanochat_jax.bench", *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"mlp_up +forward: plain [\d.]+ ms, kernel [\d.]+ ms \| forward \+ backward", result.stdout), result.stdout
    assert re.search(r"rope_qk_norm, rows None +forward", result.stdout) and re.search(r"rope_qk_norm, rows 16 +forward", result.stdout)
    assert re.search(r"xent_chunk .* kernel [\d.]+ ms", result.stdout)
    assert re.search(r"mlp_up tiles \{'bm': 128, 'bn': 128.*TF/s", result.stdout), result.stdout


def test_data_benchmark_prints_tokens_per_second(tmp_path):
    from nanochat_jax.dataset import write_shards
    from nanochat_jax.tokenizer import Tokenizer
    Tokenizer([bytes([b]) for b in range(256)]).save(str(tmp_path / "tok"))
    write_shards([f"some text number {i} " * 30 for i in range(3000)], str(tmp_path / "data"), docs_per_shard=1024, num_val_docs=100)
    out = bench("data", "--data-dir", str(tmp_path / "data"), "--tokenizer-dir", str(tmp_path / "tok"), "--threads", "1,2",
                "--batch-size", "4", "--seq-len", "128", "--batches", "20")
    assert re.search(r"threads 1: [\d,]+ tokens/s", out) and re.search(r"threads 2: [\d,]+ tokens/s", out), out


def test_decode_benchmark_prints_latency_and_mbu():
    """Both loops by default: the streaming host loop (Engine.generate) and the device loop (generate_batch)."""
    out = bench("decode", "--depth", "2", "--batch-sizes", "1,2", "--prompt-len", "8", "--steps", "4", "--max-len", "32", "--vocab-size", "512")
    for loop in ("host  ", "device"):
        assert re.search(loop + r" batch    2 \| TTFT +[\d.]+ ms \| step +[\d.]+ ms \| +[\d,]+ tok/s \| MBU +[\d.]+%", out), out
    out = bench("decode", "--depth", "2", "--batch-sizes", "3", "--prompt-len", "8", "--steps", "4", "--max-len", "32", "--vocab-size", "512",
                "--loop", "device", "--top-k", "0")
    assert "device batch    3 |" in out and "host " not in out and "top-k 0" in out, out


def test_rl_benchmark_times_rollout_scoring_and_update(tmp_path):
    from nanochat_jax.tokenizer import Tokenizer
    Tokenizer([bytes([b]) for b in range(256)]).save(str(tmp_path / "tok"))
    out = bench("rl", "--depth", "2", "--tokenizer-dir", str(tmp_path / "tok"), "--examples-per-step", "2", "--num-samples", "2",
                "--max-new-tokens", "8", "--device-batch-size", "2", "--steps", "2", "--warmup", "1")
    line = out.strip().splitlines()[-1]
    assert re.search(r"median of 2 steps: rollout [\d.]+s \([\d,]+ tok/s\) \| score [\d.]+s \| update [\d.]+s \| step [\d.]+s", line), out


def test_serve_benchmark_drives_the_server_with_the_load_test_in_its_own_process():
    """One client, then two at once, each after untimed runs until one compiles nothing (a timed line counts its own
    compiles); a reply runs to --max-tokens or a stop token."""
    out = bench("serve", "--depth", "2", "--vocab-size", "512", "--max-len", "64", "--slots", "4", "--chunk", "4",
                "--clients", "1,2", "--max-tokens", "8", "--repeats", "1")
    assert "rounds of up to 4 steps" in out, out
    for clients in (1, 2):
        line = next(line for line in out.splitlines() if line.startswith(f"  {clients} clients: "))
        assert re.search(rf"{clients}/{clients} completed, 0 errors, .* req/s \| TTFT p50 \d+ ms", line), line
        assert 0 < int(re.search(r"\| (\d+) tokens, ", line).group(1)) <= 8 * clients and "tok/s per client after its first" in line, line
        compiled, untimed = re.search(r"\| compiled in the run: (\d+) \([\d.]+ s\) after (\d+) untimed$", line).groups()
        assert 1 <= int(untimed) <= 4, line
    # one client sends the same request every run: the first untimed run compiles (some of its shapes are too quick
    # to compile for the persistent cache to keep), the second nothing, nor the timed one
    assert re.search(r"  1 clients: .*\| compiled in the run: 0 \(0.0 s\) after 2 untimed$", out, re.M), out
