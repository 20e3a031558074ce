"""
Pretrain the base model. One command for 1 device, N devices of one host, or several processes
(launched with JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_COORDINATOR_ADDRESS set; see README).

python -m pipelines.base_train --tier tiny                         # CPU, a few minutes
python -m pipelines.base_train --depth 20 --data-dir DIR           # nanochat's d20 numbers
python -m pipelines.base_train --depth 20 --resume                 # continue from the latest checkpoint
"""
import argparse
import importlib
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from evals.bpb import evaluate_bpb
from evals.core import BUNDLE_DIR_NAME, Bundle, evaluate_core
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.common import get_base_dir
from nanochat_jax.dataloader import make_loader
from nanochat_jax.engine import sample_completions
from nanochat_jax.kernels import parse as parse_kernels
from nanochat_jax.model import GPT, backend_settings, config_for_depth
from nanochat_jax.optim import build_optimizer, lr_multiplier, muon_momentum
from nanochat_jax.report import get_report, plot_metrics
from nanochat_jax.sharding import compute_init, global_batch, make_mesh
from nanochat_jax.tokenizer import get_tokenizer
from nanochat_jax.train import (RunLog, abstract_train_state, add_run_flags, init_train_state, make_eval_step, make_train_step,
                                peak_memory_bullet, peak_memory_gib, smooth_loss, stop_if_diverged)

PEAK_FLOPS = 989e12  # H100 bf16 dense, nanochat's MFU denominator

parser = argparse.ArgumentParser(description="Pretrain the base model")
parser.add_argument("--tier", type=str, default=None, choices=["tiny", "d20", "d26", "d32"], help="defaults from configs/<tier>.py")
# Model
parser.add_argument("--depth", type=int, default=20, help="layers; width is 64 per layer")
parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per row")
# Horizon: the first one set wins, in this order
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the next two)")
parser.add_argument("--target-flops", type=float, default=-1, help="total training FLOPs (-1: off)")
parser.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per parameter (Chinchilla: 20)")
# Optimization
parser.add_argument("--device-batch-size", type=int, default=32, help="rows per device per micro-step")
parser.add_argument("--total-batch-size", type=int, default=524_288, help="tokens per optimizer step")
parser.add_argument("--embedding-lr", type=float, default=0.2)
parser.add_argument("--unembedding-lr", type=float, default=0.004)
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW")
parser.add_argument("--warmup-ratio", type=float, default=0.0)
parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps with a linear LR decay at the end")
parser.add_argument("--final-lr-frac", type=float, default=0.0)
parser.add_argument("--packing", type=str, default="stream", choices=["stream", "bestfit"], help="nanochat v1 stream or HEAD best-fit rows")
parser.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass (less memory)")
parser.add_argument("--fp8", action="store_true", help="the blocks' matmuls as FP8 GEMMs (e4m3 forward, e5m2 gradients, tensorwise scales)")
# Evaluation
parser.add_argument("--eval-every", type=int, default=250, help="steps between val bpb evals (-1: only at the end)")
parser.add_argument("--eval-tokens", type=int, default=20 * 524_288, help="val tokens per eval")
parser.add_argument("--sample-every", type=int, default=2000, help="steps between greedy samples (-1: only at the end)")
parser.add_argument("--core-metric-every", type=int, default=2000, help="steps between CORE evals, and one at the end (-1: off)")
parser.add_argument("--core-metric-max-per-task", type=int, default=500, help="items per CORE task (-1: all)")
parser.add_argument("--eval-bundle", type=str, default=None, help="CORE bundle zip or directory (default: $NANOCHAT_JAX_HOME/eval_bundle "
                    "if downloaded before, else CORE is left out)")
# Runtime
parser.add_argument("--data-dir", type=str, default=None, help="parquet shards (default: downloaded, else the embedded corpus)")
parser.add_argument("--tag", type=str, default=None, help="run directory name (default: d<depth>)")
add_run_flags(parser, "base training")  # checkpoints, resume, mesh, wandb, seed, --max-steps
tier = parser.parse_known_args()[0].tier
if tier:
    parser.set_defaults(**importlib.import_module(f"configs.{tier}").base_train)  # explicit flags still win
args = parser.parse_args()
user_config = vars(args).copy()

# -----------------------------------------------------------------------------
# Compute, logging, tokenizer

master, print0 = compute_init()
on_gpu = jax.default_backend() == "gpu"
mesh = make_mesh(args.mesh)
n_dev = jax.device_count()
tag = args.tag or f"d{args.depth}"
run_dir = checkpoint_dir("base", tag)
os.makedirs(run_dir, exist_ok=True)
print0(f"run directory: {run_dir}")
tokenizer = get_tokenizer()
token_bytes = tokenizer.token_bytes

# Model geometry and batch
config = config_for_depth(args.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=args.max_seq_len)
T = args.max_seq_len
tokens_per_micro_step = args.device_batch_size * T * n_dev
if args.total_batch_size % tokens_per_micro_step:
    sys.exit(f"--total-batch-size {args.total_batch_size:,} is not a multiple of device batch x seq len x devices = "
             f"{args.device_batch_size} x {T} x {n_dev} = {tokens_per_micro_step:,}")
grad_accum = args.total_batch_size // tokens_per_micro_step
local_rows = args.device_batch_size * jax.local_device_count()  # this process's rows per micro-step
print0(f"{jax.devices()[0].device_kind} x{n_dev} ({jax.process_count()} processes), mesh {dict(mesh.shape)}")
print0(f"depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}, vocab {config.vocab_size:,}, seq {T}")
print0(f"tokens per step {args.total_batch_size:,} = {args.device_batch_size} x {T} x {n_dev} devices x {grad_accum} grad accum")

# -----------------------------------------------------------------------------
# Model, horizon, optimizer, data

model_kwargs = dict(backend_settings(), remat=args.remat, fp8=args.fp8, kernels=parse_kernels(args.kernels))
abstract_model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))  # shapes only, for the counts
num_params, flops_per_token = abstract_model.num_params(), abstract_model.estimate_flops()
if args.num_iterations > 0:
    num_iterations = args.num_iterations
elif args.target_flops > 0:
    num_iterations = round(args.target_flops / (flops_per_token * args.total_batch_size))
else:
    num_iterations = int(args.target_param_data_ratio * num_params) // args.total_batch_size
print0(f"params {num_params:,} | {flops_per_token:.3e} FLOPs/token | {num_iterations:,} steps = "
       f"{num_iterations * args.total_batch_size:,} tokens ({num_iterations * args.total_batch_size / num_params:.1f} per param), "
       f"{flops_per_token * args.total_batch_size * num_iterations:.3e} FLOPs")
schedule = dict(warmup_ratio=args.warmup_ratio, warmdown_ratio=args.warmdown_ratio, final_lr_frac=args.final_lr_frac)
tx = build_optimizer(config.n_embd, num_iterations, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                     unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay, **schedule)
train_loader = make_loader(tokenizer, local_rows, T, "train", args.data_dir, mode=args.packing,
                           process_index=jax.process_index(), process_count=jax.process_count())
checkpointer = Checkpointer(run_dir, keep=args.keep)
core_bundle = None
if args.core_metric_every > 0:
    # training never downloads it (a network wait, or a failure, mid-run): a given bundle or a cached one
    cached = os.path.join(get_base_dir(), BUNDLE_DIR_NAME)
    if args.eval_bundle or os.path.isfile(os.path.join(cached, "core.yaml")):
        core_bundle = Bundle(args.eval_bundle or cached)  # it must then be a bundle
    else:
        print0(f"CORE metric off: no eval bundle in {cached}; pass --eval-bundle PATH or run python -m pipelines.base_eval --download-only")
step, loop = 0, {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0, "val_bpb": None}
resuming = args.resume or args.resume_step is not None
if resuming:
    graphdef, abstract_state = abstract_train_state(config, tx, mesh, args.seed, **model_kwargs)
    state, meta = checkpointer.restore(args.resume_step, abstract_state, train_loader, fallback=args.fallback)
    step, loop = meta["step"], meta["loop_state"]
    print0(f"resumed from step {step} (val bpb {loop['val_bpb']})")
else:
    checkpointer.refuse_existing()
    graphdef, state = init_train_state(config, tx, mesh, args.seed, **model_kwargs)
log = RunLog(run_dir, master, resumed_step=step if resuming else None, run=args.run, config=user_config)
train_step = make_train_step(graphdef, state)
eval_step = make_eval_step(graphdef, mesh)
forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)[0](ids))

# -----------------------------------------------------------------------------
# Helpers the loop needs

def next_batch():
    """grad_accum micro-batches as global arrays (A, B, T), sharded over data × fsdp on dim 1."""
    batches = [next(train_loader) for _ in range(grad_accum)]
    x = np.stack([b["inputs"] for b in batches])
    y = np.stack([b["targets"] for b in batches])
    return global_batch(x, mesh, batch_axis=1), global_batch(y, mesh, batch_axis=1)


def eval_bpb():
    val_loader = make_loader(tokenizer, local_rows, T, "val", args.data_dir, mode=args.packing,
                             process_index=jax.process_index(), process_count=jax.process_count())
    steps = max(1, args.eval_tokens // (local_rows * T * jax.process_count()))
    return evaluate_bpb(eval_step, state, val_loader, steps, token_bytes, mesh)


def core_metric():
    """CORE of the current state on --core-metric-max-per-task items per task (evals/core.py)."""
    out = evaluate_core((graphdef, state), tokenizer, core_bundle, max_per_task=args.core_metric_max_per_task, mesh=mesh, log=print0)
    return out["core"]


def samples():
    return sample_completions(lambda ids: forward(state, ids), tokenizer)


def meta():
    return {"step": step, "loop_state": loop, "seed": args.seed, "model_config": config.__dict__, "user_config": user_config,
            "device_batch_size": args.device_batch_size, "max_seq_len": T, "total_batch_size": args.total_batch_size}


def every(n):
    return n > 0 and step % n == 0


# -----------------------------------------------------------------------------
# Training loop: num_iterations + 1 passes, so the last one evaluates, samples and saves

first_step, t_start = step, time.time()
while True:
    last = step == num_iterations
    evaluated = last or every(args.eval_every)
    if evaluated:
        loop["val_bpb"] = eval_bpb()
        loop["min_val_bpb"] = min(loop["min_val_bpb"], loop["val_bpb"])
        print0(f"step {step:05d} | val bpb {loop['val_bpb']:.4f}")
    core_evaluated = core_bundle is not None and (last or (step > 0 and every(args.core_metric_every)))
    if core_evaluated:
        loop["core_metric"] = core_metric()
        print0(f"step {step:05d} | CORE metric {loop['core_metric']:.4f}")
    if last or every(args.sample_every):
        for line in samples():  # on every process: the forward pass is one program over the whole mesh
            print0(f"  sample: {line!r}")
    if (last or every(args.save_every)) and step > first_step:
        checkpointer.save(step, state, train_loader, meta())
    if last or step == args.max_steps:
        if last:
            log.write({"step": step, "val_bpb": loop["val_bpb"], **({"core_metric": loop["core_metric"]} if core_evaluated else {})})
        break

    # ------------------------------------------------------------------- one step
    t0 = time.time()
    x, y = next_batch()
    state, metrics = train_step(state, x, y)
    loss = float(metrics["loss"])  # syncs: the log line and the NaN check need it
    dt = time.time() - t0
    stop_if_diverged(loss, metrics, step, checkpointer, run_dir)
    # -------------------------------------------------------------------

    if step > first_step + 10:
        loop["total_training_time"] += dt  # the first steps include compilation
    smooth = smooth_loss(loop, loss, step)
    tok_per_sec = args.total_batch_size / dt
    mfu = flops_per_token * tok_per_sec / (PEAK_FLOPS * n_dev) if on_gpu else 0.0
    lrm = lr_multiplier(step, num_iterations, **schedule)
    elapsed = time.time() - t_start
    eta = elapsed / (step + 1 - first_step) * (num_iterations - step - 1)
    filled = int(30 * (step + 1) / num_iterations)
    bar = f"[{'#' * filled}{'.' * (30 - filled)}] " if sys.stdout.isatty() else ""  # only for a person watching
    print0(f"{bar}step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {smooth:.6f} | lrm {lrm:.2f} | "
           f"dt {dt * 1000:.1f}ms | tok/sec {tok_per_sec:,.0f} | mfu {100 * mfu:.2f} | elapsed {elapsed / 60:.1f}m | eta {eta / 60:.1f}m")
    row = {"step": step, "loss": loss, "lrm": lrm, "momentum": muon_momentum(step), "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu}
    if evaluated:
        row["val_bpb"] = loop["val_bpb"]
    if core_evaluated:
        row["core_metric"] = loop["core_metric"]
    log.write(row)
    step += 1

checkpointer.wait()
checkpointer.close()

# Summary, report, plot
print0(f"peak memory: {peak_memory_gib():.2f} GiB")
print0(f"total training time: {loop['total_training_time'] / 60:.2f}m | min val bpb: {loop['min_val_bpb']:.4f}")
if master and step == num_iterations:
    report = get_report()
    plot_metrics(log.path, os.path.join(report.dir, "base_train_curves.png"))
    report.log("Base model training", [user_config, {
        "Number of parameters": num_params, "FLOPs per token": f"{flops_per_token:e}", "Calculated number of iterations": num_iterations,
        "Number of training tokens": num_iterations * args.total_batch_size, "DDP world size": n_dev,
        "val_bpb": loop["val_bpb"], "min_val_bpb": loop["min_val_bpb"], "Total training time (m)": loop["total_training_time"] / 60,
        **peak_memory_bullet(), **({"CORE metric estimate": loop["core_metric"]} if "core_metric" in loop else {}),
    }, "![training curves](base_train_curves.png)"])
