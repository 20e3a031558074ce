"""
Check our model and optimizers against numbers produced by PyTorch nanochat (the golden .npz files,
format in shared/golden/README.md): the same weights in must give the same numbers out.
Every measured error is printed beside its tolerance; the exit code is non-zero if any check fails.

python -m nanochat_jax.parity ../shared/golden/*.npz
python -m nanochat_jax.parity ../shared/golden/*.npz --mesh data=2,fsdp=2,tensor=2   # 8 simulated CPU devices
"""
import argparse
import contextlib
import json
import math
import os
import sys

# Flags first: a simulated mesh needs its CPU device count set before JAX starts.
parser = argparse.ArgumentParser(description="Compare against golden outputs of PyTorch nanochat")
parser.add_argument("files", nargs="+", help="golden .npz files (kinds: forward, generate, train, muon)")
parser.add_argument("--mesh", type=str, default=None, help="run forward/train on this mesh, e.g. data=2,fsdp=2,tensor=2")
args = parser.parse_args() if __name__ == "__main__" else None
if args is not None and args.mesh and "-1" not in args.mesh:
    n = math.prod(int(part.split("=")[1]) for part in args.mesh.split(",") if part)
    import jax
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_num_cpu_devices", n)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# The golden numbers are float32 maths: keep GPUs from running fp32 matmuls as TF32.
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from nanochat_jax.convert import export_nanochat_weights, load_nanochat_weights  # noqa: E402
from nanochat_jax.engine import Engine, greedy_naive  # noqa: E402
from nanochat_jax.model import GPT, GPTConfig  # noqa: E402
from nanochat_jax.muon import scale_by_muon  # noqa: E402
from nanochat_jax.optim import build_optimizer  # noqa: E402
from nanochat_jax.sharding import global_batch, make_mesh  # noqa: E402
from nanochat_jax.tokenizer import Tokenizer  # noqa: E402
from nanochat_jax.train import make_eval_step, make_train_step, shard_state  # noqa: E402

TOL = {  # from shared/golden/README.md
    "logits max abs": 2e-3, "loss abs": 1e-4, "loss_per_token max abs": 1e-4,
    "train loss abs": 2e-3, "final params rel": 0.35, "muon update rel": 0.1,
}


class Report:
    def __init__(self):
        self.failed = 0

    def check(self, name, measured, tolerance, detail=""):
        ok = bool(measured <= tolerance)
        self.failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:28s} {measured:11.3e}  <= {tolerance:.1e}  {detail}")

    def equal(self, name, ours, ref):
        ok = np.array_equal(ours, ref)
        self.failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:28s} {'equal' if ok else 'DIFFERENT'}  ours {np.asarray(ours).tolist()}" + ("" if ok else f"\n{'':36s}ref  {np.asarray(ref).tolist()}"))


def load_golden(path):
    data = np.load(path, allow_pickle=False)
    meta = json.loads(bytes(data["meta_json"]))
    return data, meta


def tensors(data, prefix):
    return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def build_model(meta, weights):
    model = GPT(GPTConfig(**meta["config"]), rngs=nnx.Rngs(0))  # fp32, XLA attention: the CPU reference path
    load_nanochat_weights(model, weights)
    return model


def pad_batch(x, multiple, fill):
    """Pad the batch dim (axis -2) to a multiple of the data-parallel size; padded targets are -1."""
    pad = -x.shape[-2] % multiple
    widths = [(0, 0)] * x.ndim
    widths[-2] = (0, pad)
    return np.pad(x, widths, constant_values=fill)


def check_forward(data, meta, mesh, report):
    model = build_model(meta, tensors(data, "w/"))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    B = data["idx"].shape[0]
    idx, targets = pad_batch(data["idx"], dp, 0), pad_batch(data["targets"], dp, -1)
    graphdef, state = shard_state(model, optax.identity(), mesh)
    idx, targets = global_batch(idx, mesh), global_batch(targets, mesh)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)[0](x))(state, idx)
    per_token = make_eval_step(graphdef, mesh)(state, idx, targets)
    valid = np.asarray(targets)[:B] >= 0
    loss = np.asarray(per_token)[:B].sum() / valid.sum()
    report.check("logits max abs", np.abs(np.asarray(logits)[:B] - data["logits"]).max(), TOL["logits max abs"])
    report.check("loss abs", abs(loss - float(data["loss"])), TOL["loss abs"])
    report.check("loss_per_token max abs", np.abs(np.asarray(per_token)[:B] - data["loss_per_token"]).max(), TOL["loss_per_token max abs"])


def check_generate(data, meta, report):
    """`generated` is nanochat's Engine stream: it ends with the stop token (<|bos|> or <|assistant_end|>)
    when greedy decoding reaches one, so it may be shorter than `naive`, which always runs n_new steps."""
    model = build_model(meta, tensors(data, "w/"))
    V = meta["config"]["vocab_size"]
    prompt, generated, n = data["prompt"].tolist(), data["generated"], len(data["naive"])
    naive = greedy_naive(model, [prompt], n)[0]  # no stop ids: the full n steps, as the reference's naive
    engine = Engine(model, Tokenizer.placeholder(V))
    streamed = [column[0] for column, _ in engine.generate(prompt, max_tokens=n, temperature=0.0)]
    batch = engine.generate_batch(prompt, max_tokens=n, temperature=0.0)[0][0]  # the same tokens, stop token left off
    stopped = streamed[-1] in engine.stop_ids
    report.equal("generated (naive greedy)", np.array(naive[:len(generated)], np.int32), generated)
    report.equal("generated (KV-cache engine)", np.array(streamed, np.int32), generated)
    report.equal("engine generate_batch", np.array(batch, np.int32), np.array(streamed[:-1] if stopped else streamed, np.int32))
    report.equal("reference naive == engine", data["naive"][:len(generated)], generated)


def check_train(data, meta, mesh, report):
    init, final = tensors(data, "init/"), tensors(data, "final/")
    model = build_model(meta, init)
    hyper = meta["hyper"]
    tx = build_optimizer(meta["config"]["n_embd"], num_iterations=None, matrix_lr=hyper["matrix_lr"],
                         embedding_lr=hyper["embedding_lr"], unembedding_lr=hyper["unembedding_lr"])
    graphdef, state = shard_state(model, tx, mesh)
    step = make_train_step(graphdef, state)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    batches = data["batches"]  # (steps, B, T+1)
    for s in range(batches.shape[0]):
        x, y = pad_batch(batches[s, :, :-1], dp, 0), pad_batch(batches[s, :, 1:], dp, -1)
        x, y = (global_batch(a[None], mesh, batch_axis=1) for a in (x, y))
        state, metrics = step(state, x, y)
        report.check(f"train loss abs, step {s}", abs(float(metrics["loss"]) - float(data["losses"][s])), TOL["train loss abs"])
    trained, _ = nnx.merge(graphdef, state)
    ours = export_nanochat_weights(trained)
    worst = max(((np.linalg.norm(ours[k] - final[k]) / np.linalg.norm(final[k] - init[k]), k) for k in final))
    report.check("final params rel", worst[0], TOL["final params rel"], f"(worst: {worst[1]})")


def check_muon(data, meta, report):
    hyper = meta["hyper"]
    tx = optax.chain(scale_by_muon(momentum=hyper["momentum"], nesterov=hyper["nesterov"], ns_steps=hyper["ns_steps"],
                                   ns_coeffs=tuple(hyper["ns_coeffs"])), optax.scale(-hyper["lr"]))
    update = jax.jit(tx.update)
    worst = (0.0, "")
    for i in range(len(meta["shapes"])):
        p = jnp.asarray(data[f"init_{i}"].T)  # torch (out, in) -> our (in, out) kernel layout
        state = tx.init(p)
        prev = data[f"init_{i}"]
        for s in range(meta["steps"]):
            u, state = update(jnp.asarray(data[f"grad_{s}_{i}"].T), state, p)
            p = p + u
            ref_u = data[f"param_{s}_{i}"] - prev
            prev = data[f"param_{s}_{i}"]
            err = np.linalg.norm(np.asarray(u).T - ref_u) / np.linalg.norm(ref_u)
            worst = max(worst, (err, f"step {s}, tensor {i} {meta['shapes'][i]}"))
    report.check("muon update rel", worst[0], TOL["muon update rel"], f"(worst: {worst[1]})")


def run(files, mesh_spec=None):
    """Check every file; returns the number of failed checks."""
    mesh = make_mesh(mesh_spec)
    report = Report()
    for path in files:
        data, meta = load_golden(path)
        kind = meta["kind"]
        where = f"mesh {dict(mesh.shape)}" if kind in ("forward", "train") else "1 device"
        print(f"{os.path.basename(path)}: {kind}, config {meta.get('config', meta.get('shapes'))}, {where}")
        with jax.set_mesh(mesh) if kind in ("forward", "train") else contextlib.nullcontext():
            if kind == "forward":
                check_forward(data, meta, mesh, report)
            elif kind == "generate":
                check_generate(data, meta, report)
            elif kind == "train":
                check_train(data, meta, mesh, report)
            elif kind == "muon":
                check_muon(data, meta, report)
            else:
                raise ValueError(f"{path}: unknown kind {kind!r}")
    print(f"{'all checks passed' if not report.failed else f'{report.failed} check(s) FAILED'}")
    return report.failed


if __name__ == "__main__":
    sys.exit(1 if run(args.files, args.mesh) else 0)
