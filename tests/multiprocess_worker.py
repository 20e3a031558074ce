"""One process of a multi-process (jax.distributed) CPU training run; launched by test_multiprocess.py.

    # 2 processes x 2 CPU devices = one 4-device global mesh (cross-process CPU collectives: gloo)
    JAX_NUM_CPU_DEVICES=2 JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT \
        python tests/multiprocess_worker.py --mesh data=2,fsdp=2          # for i in 0 1, concurrently
    # the reference: one process, 4 CPU devices, the same global batch
    JAX_NUM_CPU_DEVICES=4 python tests/multiprocess_worker.py --mesh data=2,fsdp=2

Everything is configured through the environment, so nothing touches the backend before
`init_distributed()` (jax.distributed.initialize must precede any jax.devices() or array op).
Each process feeds its own rows of a fixed global batch, runs 3 train steps, and prints one JSON
line last: {"process_index", "process_count", "local_devices", "mesh", "losses", "param_norm"}.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, when run as a script

GRAD_ACCUM, BATCH, STEPS = 2, 8, 3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mesh", default="data=2,fsdp=2")
    args = parser.parse_args()

    from nanochat_jax.sharding import init_distributed
    init_distributed()  # a no-op unless JAX_NUM_PROCESSES > 1

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from nanochat_jax.model import GPTConfig
    from nanochat_jax.optim import build_optimizer
    from nanochat_jax.sharding import global_batch, make_mesh
    from nanochat_jax.train import init_train_state, make_train_step

    config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    pid, nproc = jax.process_index(), jax.process_count()
    assert nproc == int(os.environ.get("JAX_NUM_PROCESSES", "1")), "jax.distributed did not take effect"

    mesh = make_mesh(args.mesh, devices=jax.devices())  # all global devices, every process the same mesh
    tx = build_optimizer(config.n_embd, num_iterations=10, warmdown_ratio=0.5, ns_dtype=jnp.float32)
    graphdef, state = init_train_state(config, tx, mesh, seed=0)  # same seed -> same params everywhere
    step = make_train_step(graphdef, state)

    rng = np.random.default_rng(0)  # the same global batches on every process; each feeds its rows
    rows = slice(pid * BATCH // nproc, (pid + 1) * BATCH // nproc)
    losses = []
    for _ in range(STEPS):
        batch = rng.integers(0, config.vocab_size, (GRAD_ACCUM, BATCH, config.sequence_len + 1), dtype=np.int32)
        local = batch[:, rows]
        x, y = (global_batch(a, mesh, batch_axis=1) for a in (local[..., :-1], local[..., 1:]))
        assert x.shape == (GRAD_ACCUM, BATCH, config.sequence_len), x.shape  # global shape from local slices
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))  # a replicated scalar: readable on every process

    # The params are sharded across processes (np.asarray on them would fail): compare a replicated summary
    model, _ = nnx.merge(graphdef, state)
    param_norm = jax.jit(optax.tree.norm, out_shardings=NamedSharding(mesh, P()))(nnx.state(model, nnx.Param))
    print(json.dumps({"process_index": pid, "process_count": nproc, "local_devices": jax.local_device_count(),
                      "mesh": [[d.process_index for d in row] for row in mesh.devices.reshape(mesh.devices.shape[0], -1)],
                      "losses": losses, "param_norm": float(param_norm)}), flush=True)


if __name__ == "__main__":
    main()
