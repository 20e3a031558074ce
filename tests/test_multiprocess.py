"""Multi-process training under jax.distributed on CPU: 2 processes x 2 CPU devices form one 4-device
mesh (cross-process collectives through gloo), each feeds half of the global batch, and the losses
and final parameters must equal one process with 4 local devices on the same global batch."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
TIMEOUT = 240  # seconds for the whole run (it takes ~50 s); a worker waiting on a peer that never came would wait 300 s


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(local_devices, **distributed):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS")) and "_proxy" not in k.lower()}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(local_devices),  # read at backend init, like jax.config.update("jax_num_cpu_devices")
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # jax 0.10's default; without it CPU has no cross-process collectives
        XLA_FLAGS="--xla_backend_optimization_level=0",  # halves the CPU compile time; same losses to the bit
        PYTHONUNBUFFERED="1",
        **{k: str(v) for k, v in distributed.items()},
    )
    return env


def run_all(commands, json_result=True):
    """Start every (name, argv, env) at once; wait for all of them; kill the rest as soon as one fails
    or time runs out, so a worker blocked in a collective on a dead peer never hangs the test."""
    procs = {name: subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, argv, env in commands}
    deadline = time.monotonic() + TIMEOUT
    failure = None
    try:
        while None in [p.poll() for p in procs.values()]:  # a list, not any(): poll every process
            failed = [n for n, p in procs.items() if p.returncode not in (None, 0)]
            if failed:
                failure = f"{failed[0]} exited with status {procs[failed[0]].returncode}"
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {TIMEOUT} s (no cross-process CPU collectives, or a worker waiting on its peer?)"
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        outputs = {name: p.communicate()[0] for name, p in procs.items()}
    failed = [n for n, p in procs.items() if p.returncode != 0]
    if failure or failed:
        tails = "\n".join(f"--- {n} (status {procs[n].returncode}) ---\n{outputs[n][-3000:]}" for n in procs)
        pytest.fail(f"multi-process run failed: {failure or f'{failed} exited non-zero'}\n{tails}")
    if not json_result:
        return outputs
    results = {}
    for name, out in outputs.items():
        lines = [line for line in out.splitlines() if line.startswith("{")]  # shutdown may log after the result
        try:
            results[name] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            pytest.fail(f"{name} printed no JSON result; its output ends:\n{out[-3000:]}")
    return results


@pytest.mark.parametrize("mesh_spec, layout", [
    # which process owns each device, rows = data: jax.devices() lists process 0's devices first
    ("data=2,fsdp=2", [[0, 0], [1, 1]]),  # FSDP inside a process; the gradient all-reduce over data crosses
    pytest.param("fsdp=2,tensor=2", [[0, 0, 1, 1]], marks=pytest.mark.slow),  # params sharded across processes
])
def test_two_processes_train_like_one(mesh_spec, layout):
    port = free_port()
    python = [sys.executable, WORKER, "--mesh", mesh_spec]
    workers = [(f"process {i}", python, worker_env(2, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i,
                                                  JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                  JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}"))  # not [::]: loopback only
               for i in range(2)]
    results = run_all(workers + [("reference", python, worker_env(4))])
    p0, p1, ref = results["process 0"], results["process 1"], results["reference"]

    assert (p0["process_index"], p0["process_count"], p0["local_devices"]) == (0, 2, 2)
    assert (p1["process_index"], p1["process_count"], p1["local_devices"]) == (1, 2, 2)
    assert (ref["process_index"], ref["process_count"], ref["local_devices"]) == (0, 1, 4)
    assert p0["mesh"] == p1["mesh"] == layout  # one global mesh over both processes' devices
    # every process computes the same replicated scalars, equal to the single-process run
    assert p0["losses"] == p1["losses"] and p0["param_norm"] == p1["param_norm"]
    np.testing.assert_allclose(p0["losses"], ref["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(p0["param_norm"], ref["param_norm"], rtol=1e-6)


def test_base_train_command_runs_as_two_processes(tmp_path):
    """The pretraining stage itself, launched as README says: 2 processes x 1 CPU device, one mesh,
    each reading its own row groups; it trains, evaluates, samples and saves checkpoints."""
    from nanochat_jax.dataset import write_shards
    from nanochat_jax.tokenizer import Tokenizer
    Tokenizer([bytes([b]) for b in range(256)]).save(str(tmp_path / "tokenizer"))  # bytes: no training needed
    data = write_shards([f"the text of document {i}. " * 30 for i in range(3000)], str(tmp_path / "data"), docs_per_shard=1024, num_val_docs=200)
    port = free_port()
    argv = [sys.executable, "-m", "pipelines.base_train", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4",
            "--total-batch-size", "512", "--num-iterations", "6", "--eval-every", "3", "--eval-tokens", "1024",
            "--sample-every", "-1", "--save-every", "3", "--tag", "mp", "--data-dir", data]
    repo = os.path.dirname(os.path.dirname(WORKER))
    commands = [(f"process {i}", argv, {**worker_env(1, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}"),
                                         "NANOCHAT_JAX_HOME": str(tmp_path), "PYTHONPATH": repo}) for i in range(2)]
    outputs = run_all(commands, json_result=False)
    assert "(2 processes)" in outputs["process 0"] and "step 00006 | val bpb" in outputs["process 0"]
    rows = [json.loads(line) for line in open(tmp_path / "base_checkpoints" / "mp" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(7)) and rows[-1]["val_bpb"] < rows[0]["val_bpb"]
    assert sorted(os.listdir(tmp_path / "base_checkpoints" / "mp")) == ["3", "6", "metrics.jsonl"]
