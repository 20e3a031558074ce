"""
Midtraining (nanochat v1 mid_train): the base model learns the chat format, tool use and multiple choice
from a mixture of conversations, packed into the pretraining stream and trained on every token, one epoch.
Same optimizers and LRs as base (fresh state), no weight decay; LR constant, then linear to 0 over the last
20% of the epoch (the schedule nanochat fixed in its issue #68). Checkpoints resume bit for bit.

python -m pipelines.mid_train --tag d20                        # nanochat's mixture from the hub (else offline)
python -m pipelines.mid_train --tag d4 --mixture offline       # no network
python -m pipelines.mid_train --tag d20 --resume
"""
import argparse
import os
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from evals.bpb import evaluate_bpb
from nanochat_jax.chat_dataloader import make_mid_loader, mid_stream_tokens
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, source_run, start_or_resume
from nanochat_jax.kernels import parse as parse_kernels
from nanochat_jax.mixtures import add_mixture_flags, mixture
from nanochat_jax.model import GPTConfig, backend_settings
from nanochat_jax.optim import build_optimizer, lr_multiplier, muon_momentum
from nanochat_jax.report import get_report, plot_metrics
from nanochat_jax.sharding import compute_init, global_batch, make_mesh
from nanochat_jax.tokenizer import get_tokenizer
from nanochat_jax.train import (RunLog, add_finetune_flags, add_run_flags, finetune_lrs, make_eval_step, make_train_step, peak_memory_bullet,
                                peak_memory_gib, smooth_loss, stop_if_diverged)

parser = argparse.ArgumentParser(description="Midtrain a base model on conversations")
parser.add_argument("--tag", type=str, default=None, help="base run to start from, and this run's name (default: the latest base run)")
parser.add_argument("--step", type=int, default=None, help="base checkpoint step (default: the latest)")
add_mixture_flags(parser)  # --mixture, --tasks-dir, --word-list, --mixture-fraction
parser.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: one epoch of the mixture)")
parser.add_argument("--device-batch-size", type=int, default=32)
parser.add_argument("--total-batch-size", type=int, default=524_288, help="tokens per optimizer step")
parser.add_argument("--max-seq-len", type=int, default=None, help="tokens per row (default: the base run's)")
add_finetune_flags(parser, init_lr_frac=1.0)  # LRs: the source run's, times --init-lr-frac; no weight decay
parser.add_argument("--eval-every", type=int, default=150, help="steps between val bpb evals (-1: only at the end)")
parser.add_argument("--eval-tokens", type=int, default=20 * 524_288)
add_run_flags(parser, "midtraining")  # checkpoints, resume, mesh, wandb, seed, --max-steps
args = parser.parse_args()
user_config = vars(args).copy()
master, print0 = compute_init()
mesh = make_mesh(args.mesh)
n_dev, n_proc = jax.device_count(), jax.process_count()
tag, base_meta = source_run("base", args.tag, args.step)
config = GPTConfig(**base_meta["model_config"])
T = args.max_seq_len or base_meta["max_seq_len"]
lrs = finetune_lrs(args, base_meta, user_config)
tokens_per_micro_step = args.device_batch_size * T * n_dev
if args.total_batch_size % tokens_per_micro_step:
    sys.exit(f"--total-batch-size {args.total_batch_size:,} is not a multiple of device batch x seq len x devices = {tokens_per_micro_step:,}")
grad_accum = args.total_batch_size // tokens_per_micro_step
local_rows = args.device_batch_size * jax.local_device_count()
run_dir = checkpoint_dir("mid", tag)
os.makedirs(run_dir, exist_ok=True)
print0(f"midtraining base {tag} step {base_meta['step']} -> {run_dir}")
print0(f"tokens per step {args.total_batch_size:,} = {args.device_batch_size} x {T} x {n_dev} devices x {grad_accum} grad accum")

# Data: one epoch of the mixture, its length in steps counted up front (the LR schedule needs it)
tokenizer = get_tokenizer()
mix_args = dict(source=args.mixture, tasks_dir=args.tasks_dir, word_list=args.word_list, fraction=args.mixture_fraction, log=print0)
train_mix = mixture("mid", "train", **mix_args)
val_mix = mixture("mid", "val", **dict(mix_args, source=train_mix.kind))  # the same kind of sources
print0(f"train mixture {train_mix.describe()}\nval mixture {val_mix.describe()}")
shard = dict(process_index=jax.process_index(), process_count=n_proc)
checkpointer = Checkpointer(run_dir, keep=args.keep)
resuming = args.resume or args.resume_step is not None
if args.num_iterations > 0:
    num_iterations = args.num_iterations
elif resuming and checkpointer.latest_step() is not None:
    num_iterations = checkpointer.read_meta(args.resume_step)["num_iterations"]  # counted when the run started
else:
    t0 = time.time()
    tokens = mid_stream_tokens(train_mix.task, tokenizer, **shard)
    windows = int(np.min(multihost_utils.process_allgather(np.int64(tokens // (local_rows * T + 1)))))  # the slowest process
    num_iterations = windows // grad_accum
    print0(f"one epoch: {tokens:,} tokens on this process -> {num_iterations:,} steps (counted in {time.time() - t0:.1f}s)")
if num_iterations < 1:
    sys.exit(f"the mixture holds less than one step of {args.total_batch_size:,} tokens; lower --total-batch-size or add data")

schedule = dict(warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0)  # constant, then linear to 0 over the last 20%
tx = build_optimizer(config.n_embd, num_iterations, weight_decay=args.weight_decay, **lrs, **schedule)
model_kwargs = dict(backend_settings(), kernels=parse_kernels(args.kernels))
train_loader = make_mid_loader(train_mix.task, tokenizer, local_rows, T, **shard)
loop = {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0, "val_bpb": None}
graphdef, state, step, loop = start_or_resume(checkpointer, args, ("base", tag, args.step), config, tx, mesh, train_loader, loop, **model_kwargs)
log = RunLog(run_dir, master, resumed_step=step if resuming else None, run=args.run, config=user_config)
train_step, eval_step = make_train_step(graphdef, state), make_eval_step(graphdef, mesh)


def eval_bpb():
    val_loader = make_mid_loader(val_mix.task, tokenizer, local_rows, T, **shard)
    steps = max(1, args.eval_tokens // (local_rows * T * n_proc))  # or fewer: the val mixture may end first
    return evaluate_bpb(eval_step, state, val_loader, steps, tokenizer.token_bytes, mesh)


def meta():
    return {"step": step, "num_iterations": num_iterations, "loop_state": loop, "seed": args.seed, "model_config": config.__dict__,
            "user_config": user_config, "device_batch_size": args.device_batch_size, "max_seq_len": T,
            "total_batch_size": args.total_batch_size, "base": {"tag": tag, "step": base_meta["step"]},
            "sources": train_mix.sources, "mixture": train_mix.kind}


# -----------------------------------------------------------------------------
# num_iterations + 1 passes: the last evaluates and saves

first_step, t_start = step, time.time()
while True:
    last = step == num_iterations
    if last or (args.eval_every > 0 and step % args.eval_every == 0):
        loop["val_bpb"] = eval_bpb()
        loop["min_val_bpb"] = min(loop["min_val_bpb"], loop["val_bpb"])
        print0(f"step {step:05d} | val bpb {loop['val_bpb']:.4f}")
        log.write({"step": step, "val_bpb": loop["val_bpb"]})
    if (last or (args.save_every > 0 and step % args.save_every == 0)) and step > first_step:
        checkpointer.save(step, state, train_loader, meta())
    if last or step == args.max_steps:
        break

    t0 = time.time()
    try:
        micro = [next(train_loader) for _ in range(grad_accum)]
    except StopIteration:  # --num-iterations past one epoch: stop where the data ends, as nanochat does
        print0(f"the mixture's epoch ended at step {step} of {num_iterations}: finishing here")
        num_iterations = step
        continue
    x = global_batch(np.stack([b["inputs"] for b in micro]), mesh, batch_axis=1)
    y = global_batch(np.stack([b["targets"] for b in micro]), mesh, batch_axis=1)
    state, metrics = train_step(state, x, y)
    loss = float(metrics["loss"])
    dt = time.time() - t0
    stop_if_diverged(loss, metrics, step, checkpointer, run_dir)
    if step > first_step + 10:
        loop["total_training_time"] += dt  # the first steps include compilation
    smooth = smooth_loss(loop, loss, step)
    lrm = lr_multiplier(step, num_iterations, **schedule)
    print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {smooth:.6f} | lrm {lrm:.2f} | "
           f"dt {dt * 1000:.1f}ms | tok/sec {args.total_batch_size / dt:,.0f} | elapsed {(time.time() - t_start) / 60:.1f}m")
    log.write({"step": step, "loss": loss, "lrm": lrm, "momentum": muon_momentum(step), "dt": dt, "tok_per_sec": args.total_batch_size / dt})
    step += 1

checkpointer.wait()
checkpointer.close()
print0(f"peak memory: {peak_memory_gib():.2f} GiB | total training time: {loop['total_training_time'] / 60:.2f}m | "
       f"min val bpb: {loop['min_val_bpb']:.4f}")
if master and step == num_iterations:
    report = get_report()
    plot_metrics(log.path, os.path.join(report.dir, "mid_train_curves.png"), title="midtraining")
    report.log("Midtraining", [user_config, {
        "Base checkpoint": f"{tag} step {base_meta['step']}", "Mixture": train_mix.kind,
        "Train rows": len(train_mix.task), "Number of iterations": num_iterations, "DDP world size": n_dev,
        "val_bpb": loop["val_bpb"], "min_val_bpb": loop["min_val_bpb"], "Total training time (m)": loop["total_training_time"] / 60,
        **peak_memory_bullet(),
    }, "Train sources (rows):", *[f"- {name}: {rows:,}" for name, rows in train_mix.sources],
        "Val sources (rows):", *[f"- {name}: {rows:,}" for name, rows in val_mix.sources],
        "![training curves](mid_train_curves.png)"])
