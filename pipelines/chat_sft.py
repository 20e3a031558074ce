"""
Supervised fine-tuning (nanochat v1 chat_sft): conversations one per row, loss on the assistant's tokens only
(the render mask), 32 examples per step in micro-batches of 4 per device with gradient accumulation, base LRs
x 0.02 falling linearly to 0, one epoch. Every micro-batch of a step is padded to one of a few fixed lengths
(powers of two up to the context), so a handful of shapes compile. The loss is a mean over the trained tokens
of each micro-batch, and the step's gradient the mean over its micro-batches, as in nanochat.

python -m pipelines.chat_sft --source mid --tag d20
python -m pipelines.chat_sft --tag d4 --mixture offline --mixture-fraction 0.1
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from evals.chat_eval import run_categorical
from nanochat_jax.chat_dataloader import SFTBatches
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, source_run, start_or_resume
from nanochat_jax.kernels import parse as parse_kernels
from nanochat_jax.mixtures import add_mixture_flags, in_tasks_dir, mixture
from nanochat_jax.model import GPTConfig, backend_settings
from nanochat_jax.optim import build_optimizer, lr_multiplier
from nanochat_jax.report import get_report, plot_metrics
from nanochat_jax.sharding import compute_init, global_batch, make_mesh
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.common import TaskDataError
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tokenizer import get_tokenizer
from nanochat_jax.train import (RunLog, add_finetune_flags, add_run_flags, finetune_lrs, make_eval_step, make_train_step, peak_memory_bullet,
                                peak_memory_gib, smooth_loss, stop_if_diverged)

parser = argparse.ArgumentParser(description="Supervised fine-tuning on conversations")
parser.add_argument("--source", type=str, default="mid", choices=["base", "mid"], help="stage to start from")
parser.add_argument("--tag", type=str, default=None, help="run to start from, and this run's name (default: the source's latest)")
parser.add_argument("--step", type=int, default=None, help="source checkpoint step (default: the latest)")
add_mixture_flags(parser)  # --mixture, --tasks-dir, --word-list, --mixture-fraction
parser.add_argument("--num-epochs", type=int, default=1)
parser.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: num_epochs of the mixture)")
parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per device per micro-step")
parser.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step")
parser.add_argument("--max-seq-len", type=int, default=None, help="longest conversation in tokens (default: the source run's)")
add_finetune_flags(parser, init_lr_frac=0.02)  # LRs: the source run's, times --init-lr-frac; no weight decay
parser.add_argument("--eval-every", type=int, default=100, help="steps between val losses (-1: only at the end)")
parser.add_argument("--eval-steps", type=int, default=100, help="val micro-batches per val loss")
parser.add_argument("--eval-metrics-every", type=int, default=200, help="steps between MMLU / ARC-Easy accuracies (-1: only at the end)")
parser.add_argument("--eval-metrics-max-problems", type=int, default=1024)
add_run_flags(parser, "SFT")  # checkpoints, resume, mesh, wandb, seed, --max-steps
args = parser.parse_args()
user_config = vars(args).copy()
master, print0 = compute_init()
mesh = make_mesh(args.mesh)
n_dev, n_proc = jax.device_count(), jax.process_count()
tag, source_meta = source_run(args.source, args.tag, args.step)
config = GPTConfig(**source_meta["model_config"])
T = args.max_seq_len or source_meta["max_seq_len"]
lrs = finetune_lrs(args, source_meta, user_config)
global_rows = args.device_batch_size * n_dev
if args.examples_per_step % global_rows:
    sys.exit(f"--examples-per-step {args.examples_per_step} is not a multiple of device batch x devices = {global_rows}")
grad_accum = args.examples_per_step // global_rows
run_dir = checkpoint_dir("sft", tag)
os.makedirs(run_dir, exist_ok=True)
print0(f"SFT from {args.source} {tag} step {source_meta['step']} -> {run_dir}")
print0(f"{args.examples_per_step} conversations per step = {args.device_batch_size} x {n_dev} devices x {grad_accum} grad accum, "
       f"up to {T} tokens each")

tokenizer = get_tokenizer()
mix_args = dict(source=args.mixture, tasks_dir=args.tasks_dir, word_list=args.word_list, fraction=args.mixture_fraction, log=print0)
train_mix = mixture("sft", "train", **mix_args)
val_mix = mixture("sft", "val", **dict(mix_args, source=train_mix.kind))
train_task = train_mix.task if args.num_epochs == 1 else type(train_mix.task)([train_mix.task] * args.num_epochs)
print0(f"train mixture {train_mix.describe()}\nval mixture {val_mix.describe()}")
shard = dict(process_index=jax.process_index(), process_count=n_proc)
train_loader = SFTBatches(train_task, tokenizer, args.examples_per_step, grad_accum, global_rows, T, **shard)
num_iterations = args.num_iterations if args.num_iterations > 0 else train_loader.num_steps
if num_iterations < 1 or num_iterations > train_loader.num_steps:
    sys.exit(f"{num_iterations} steps asked for, the mixture has {train_loader.num_steps} of {args.examples_per_step} examples")

schedule = dict(warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)  # 1 - step / num_iterations
tx = build_optimizer(config.n_embd, num_iterations, weight_decay=args.weight_decay, **lrs, **schedule)
model_kwargs = dict(backend_settings(), kernels=parse_kernels(args.kernels))
checkpointer = Checkpointer(run_dir, keep=args.keep)
resuming = args.resume or args.resume_step is not None
loop = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "tokens": 0, "trained": 0, "padded": 0}
graphdef, state, step, loop = start_or_resume(checkpointer, args, (args.source, tag, args.step), config, tx, mesh, train_loader, loop,
                                              **model_kwargs)
log = RunLog(run_dir, master, resumed_step=step if resuming else None, run=args.run, config=user_config)
train_step, eval_step = make_train_step(graphdef, state), make_eval_step(graphdef, mesh)


def val_loss():
    """Mean loss per trained token over --eval-steps micro-batches of the val mixture."""
    loader = SFTBatches(val_mix.task, tokenizer, global_rows, 1, global_rows, T, **shard)
    nats, count = 0.0, 0
    for _ in range(min(args.eval_steps, loader.num_steps)):
        batch = next(loader)
        x, y = global_batch(batch["inputs"][0], mesh), global_batch(batch["targets"][0], mesh)
        nats += float(jnp.sum(jnp.where(y >= 0, eval_step(state, x, y), 0.0)))
        count += batch["trained"]
    return nats / max(count, 1)


def metric_tasks():
    """MMLU test and ARC-Easy test, where their data is at hand (offline: only from --tasks-dir)."""
    tasks = {}
    for name, local_name, build in (("mmlu_acc", "mmlu_test", lambda: MMLU("all", "test", tasks_dir=args.tasks_dir)),
                                    ("arc_easy_acc", "arc_easy_test", lambda: ARC("ARC-Easy", "test", tasks_dir=args.tasks_dir))):
        if train_mix.kind == "offline" and not in_tasks_dir(local_name, args.tasks_dir):
            print0(f"{name}: left out (offline, and no {local_name} in the tasks directory)")
            continue
        try:
            tasks[name] = build()
        except TaskDataError as e:
            print0(f"{name}: left out ({str(e).splitlines()[0]})")
    return tasks


def categorical_metrics():
    """Accuracy on the first --eval-metrics-max-problems of each metric task, through chat_eval's categorical path."""
    model = nnx.merge(graphdef, state)[0]
    return {name: float(np.mean(run_categorical(model, tokenizer, task, range(min(args.eval_metrics_max_problems, len(task))))))
            for name, task in eval_tasks.items()}


eval_tasks = metric_tasks() if n_proc == 1 else {}  # the categorical path feeds host arrays to one program: one process


def meta():
    return {"step": step, "num_iterations": num_iterations, "loop_state": loop, "seed": args.seed, "model_config": config.__dict__,
            "user_config": user_config, "max_seq_len": T,
            "device_batch_size": args.device_batch_size, "source": {"stage": args.source, "tag": tag, "step": source_meta["step"]},
            "sources": train_mix.sources, "mixture": train_mix.kind}


def every(n):
    return n > 0 and step % n == 0


# -----------------------------------------------------------------------------
# num_iterations + 1 passes: the last evaluates and saves

first_step, t_start = step, time.time()
while True:
    last = step == num_iterations
    row = {"step": step}
    if last or every(args.eval_every):
        loop["val_loss"] = row["val_loss"] = val_loss()
        print0(f"step {step:05d} | val loss {loop['val_loss']:.4f}")
    if last or every(args.eval_metrics_every):
        accuracies = categorical_metrics()
        loop.update(accuracies)
        row.update(accuracies)
        if accuracies:
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in accuracies.items()))
    if len(row) > 1:
        log.write(row)
    if (last or every(args.save_every)) and step > first_step:
        checkpointer.save(step, state, train_loader, meta())
    if last or step == args.max_steps:
        break

    t0 = time.time()
    batch = next(train_loader)
    x, y = global_batch(batch["inputs"], mesh, batch_axis=1), global_batch(batch["targets"], mesh, batch_axis=1)
    state, metrics = train_step(state, x, y)
    loss = float(metrics["loss"])
    dt = time.time() - t0
    stop_if_diverged(loss, metrics, step, checkpointer, run_dir)
    if step > first_step + 10:
        loop["total_training_time"] += dt
    for k in ("tokens", "trained", "padded"):
        loop[k] += batch[k]
    smooth = smooth_loss(loop, loss, step)
    lrm = lr_multiplier(step, num_iterations, **schedule)
    print0(f"step {step:05d}/{num_iterations:05d} | loss {smooth:.6f} | lrm {lrm:.3f} | L {batch['inputs'].shape[-1]} | "
           f"non-padding {batch['tokens'] / batch['padded']:.2f} | dt {dt * 1000:.1f}ms | tok/sec {batch['tokens'] / dt:,.0f}")
    log.write({"step": step, "loss": loss, "lrm": lrm, "dt": dt, "seq_len": int(batch["inputs"].shape[-1]),
               "tokens": batch["tokens"], "trained": batch["trained"], "tok_per_sec": batch["tokens"] / dt})
    step += 1

checkpointer.wait()
checkpointer.close()
non_padding = loop["tokens"] / max(loop["padded"], 1)
print0(f"peak memory: {peak_memory_gib():.2f} GiB | total training time: {loop['total_training_time'] / 60:.2f}m | "
       f"non-padding fraction {non_padding:.3f}")
if master and step == num_iterations:
    report = get_report()
    plot_metrics(log.path, os.path.join(report.dir, "chat_sft_curves.png"), title="SFT", val_key="val_loss", val_label="val loss")
    report.log("Chat SFT", [user_config, {
        "Source checkpoint": f"{args.source} {tag} step {source_meta['step']}", "Mixture": train_mix.kind,
        "Train rows": len(train_task), "Number of iterations": num_iterations, "DDP world size": n_dev,
        "Non-padding token fraction": non_padding, "Trained token fraction": loop["trained"] / max(loop["padded"], 1),
        "val_loss": loop["val_loss"], **{k: loop[k] for k in ("mmlu_acc", "arc_easy_acc") if k in loop},
        "Total training time (m)": loop["total_training_time"] / 60, **peak_memory_bullet(),
    }, "Train sources (rows):", *[f"- {name}: {rows:,}" for name, rows in train_mix.sources],
        "Val sources (rows):", *[f"- {name}: {rows:,}" for name, rows in val_mix.sources],
        "![training curves](chat_sft_curves.png)"])
