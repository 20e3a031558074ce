import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import pytest

# Tests never read or write the user's ~/.cache/nanochat_jax: one throwaway home per test session.
os.environ["NANOCHAT_JAX_HOME"] = tempfile.mkdtemp(prefix="nanochat_jax_test_home_")

# Eight simulated CPU devices, so sharded code runs on real meshes (must precede JAX's first use).
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")  # silent broadcasting fails loudly


# The files in order of their time on a 2-core AMD EPYC (2026-12-07, seconds), longest first; the rest follow
# in their own order. Two xdist workers take files from the front of the queue as they free up, so the longest
# (the end-to-end speedrun) runs beside everything else instead of after it. (On 2 busy cores this did not
# shorten the suite: 25 min 59 s against 26 min 7 s; only less work does.)
LONGEST_FIRST = ["test_run_speedrun.py",  # 927
                 "test_engine.py", "test_mid_train.py", "test_checkpoint.py", "test_scheduler.py", "test_rl.py",  # 232, 168, 166, ~130, 126
                 "test_bench.py", "test_multiprocess.py", "test_kernels.py", "test_parity.py",  # 108, 106, 106, 98
                 "test_sharding.py", "test_web.py", "test_core.py", "test_model.py"]  # 97, 96, 85, 77


def pytest_collection_modifyitems(items):
    """Run the files longest first (xdist keeps this order with --no-loadscope-reorder, in pyproject's addopts;
    its default sorts files by their number of tests)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within files is kept


def randomize(model, seed=1, scale=0.3):
    """Draw every parameter N(0, scale²) in place: unlike the init (zero output projections, a tiny
    lm_head), every weight then shapes the output. Returns the model."""
    from flax import nnx
    params = [p for _, p in nnx.iter_graph(model) if isinstance(p, nnx.Param)]
    for key, param in zip(jax.random.split(jax.random.key(seed), len(params)), params):
        param[...] = jax.random.normal(key, param.shape) * scale
    return model


def memorise(model, tokenizer, conversations, steps, lr):
    """Train model in place with Adam on the conversations' trained tokens (render mask 1), one batch of
    all of them, for `steps` steps; returns the final loss."""
    import jax.numpy as jnp
    import optax
    from flax import nnx
    rows = [tokenizer.render_conversation(c) for c in conversations]
    T = max(len(ids) for ids, _ in rows)
    ids = jnp.asarray([i + [0] * (T - len(i)) for i, _ in rows], jnp.int32)
    targets = jnp.asarray([[t if m else -1 for t, m in zip(i[1:], mask[1:])] + [-1] * (T - len(i)) for i, mask in rows], jnp.int32)
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(ids[:, :-1], targets))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(steps):
        loss = train_step(model, optimizer)
    return float(loss)


# -----------------------------------------------------------------------------
# Costly fixtures built once per test run and shared by the xdist workers (they run in separate processes).

@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, worker_id):
    """A directory of this test run that every worker sees: under xdist the parent of the workers' temp dirs."""
    return tmp_path_factory.getbasetemp().parent if worker_id != "master" else tmp_path_factory.getbasetemp()


def built_once(run_dir, name, build):
    """run_dir/name, made by build(path) for the first worker that asks; the others wait on the lock, then
    reuse it. Callers that write into it take a copy."""
    target = run_dir / name
    with open(run_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (run_dir / f"{name}.done").exists():
            shutil.rmtree(target, ignore_errors=True)  # a build that failed midway
            target.mkdir()
            build(target)
            (run_dir / f"{name}.done").touch()
    return target


# -----------------------------------------------------------------------------
# A real chat server for the web tests: a tiny GPT trained to answer two prompts, saved as a training
# checkpoint, exported with `python -m nanochat_jax.export`, then served by `python -m web.server`.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT_REPLIES = {"Hi": "Hello! 👋 你好", "Tell me a story": "la " * 70}  # the second runs long: for cancelling mid-stream


@pytest.fixture(scope="session")
def chat_export(run_dir):
    """A served export of a tiny GPT trained to give CHAT_REPLIES (read-only: the server and chat_cli only load it)."""
    return str(built_once(run_dir, "chat", build_chat_export) / "export")


def build_chat_export(root):
    from flax import nnx
    from nanochat_jax.checkpoint import Checkpointer
    from nanochat_jax.dataloader import make_loader
    from nanochat_jax.dataset import write_shards
    from nanochat_jax.model import GPTConfig
    from nanochat_jax.optim import build_optimizer
    from nanochat_jax.sharding import make_mesh
    from nanochat_jax.tokenizer import Tokenizer
    from nanochat_jax.train import init_train_state

    home = root / "home"
    tokenizer = Tokenizer([bytes([b]) for b in range(256)])  # bytes: emoji and CJK span several tokens
    tokenizer.save(str(home / "tokenizer"))
    config = GPTConfig(sequence_len=256, vocab_size=272, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    graphdef, state = init_train_state(config, build_optimizer(config.n_embd, num_iterations=None), make_mesh("data=1", devices=jax.devices()[:1]))
    model, train_optimizer = nnx.merge(graphdef, state)

    conversations = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHAT_REPLIES.items()]
    loss = memorise(model, tokenizer, conversations, steps=250, lr=3e-3)
    assert loss < 0.05, loss

    data = str(root / "data")
    write_shards([f"doc {i}" for i in range(30)], data, docs_per_shard=10, num_val_docs=5)
    ckpt = Checkpointer(str(home / "sft_checkpoints" / "chat"))
    ckpt.save(250, nnx.state((model, train_optimizer)), make_loader(tokenizer, 1, 4, data_dir=data), {"step": 250, "model_config": config.__dict__})
    ckpt.wait()
    ckpt.close()
    out = root / "export"
    subprocess.run([sys.executable, "-m", "nanochat_jax.export", "--stage", "sft", "--tag", "chat", "--out", str(out), "--dtype", "float32"],
                   cwd=REPO, env=dict(os.environ, NANOCHAT_JAX_HOME=str(home)), check=True, capture_output=True, timeout=300)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if json.load(response)["ready"]:  # every shape compiled
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no server at {url} after {timeout} s")


@pytest.fixture(scope="session")
def web_server(chat_export):
    """Base URL of `python -m web.server --checkpoint <export>` on a free loopback port."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "web.server", "--checkpoint", chat_export, "--port", str(port), "--slots", "4", "--no-warmup"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


# -----------------------------------------------------------------------------
# A base run to post-train: a small tokenizer and 2-layer model trained for a few steps on the embedded
# corpus, through the real pipelines (mid_train and chat_sft start from its checkpoint).

def run_stage(home, module, *flags, timeout=900):
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_NUM_CPU_DEVICES="1")
    result = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{module} {' '.join(flags)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def base_run(home):
    """`home` with a 512-token tokenizer and a base run d2 (10 steps, seq 64). Returns home."""
    from nanochat_jax.dataset import _sotu_documents
    from nanochat_jax.tokenizer import Tokenizer
    Tokenizer.train_from_iterator(iter(_sotu_documents()[:200]), 512).save(str(home / "tokenizer"))
    run_stage(home, "pipelines.base_train", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4",
              "--total-batch-size", "256", "--num-iterations", "10", "--eval-every", "-1", "--eval-tokens", "1024",
              "--sample-every", "-1", "--core-metric-every", "-1", "--tag", "d2")
    return home


def copy_of_base_run(run_dir, tmp_path_factory):
    """A module's own home holding base_run's outputs (made once per test run, then copied: stages write into it)."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(built_once(run_dir, "base_run", base_run), home, dirs_exist_ok=True)
    return home


def metrics_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
