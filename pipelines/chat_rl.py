"""
Reinforcement learning (nanochat v1 chat_rl, spec §8.4): REINFORCE with a per-question baseline on GSM8K (or
SpellingBee, whose rewards need no downloaded data). Each step: 16 questions x 16 samples rolled out together on
the engine's device loop from the current weights (T = 1, top-k 50, 256 new tokens, the calculator on), scored
1/0, then one sharded update on the per-token weighted loss (nanochat_jax/rl.py). Base LRs x 0.05 falling
linearly to 0 over one epoch; pass@1..8 on held-out questions and a checkpoint every 60 steps.

python -m pipelines.chat_rl --source sft --tag d20
python -m pipelines.chat_rl --task SpellingBee --examples-per-step 4 --num-samples 8 --num-iterations 10
"""
import argparse
import os
import sys

import jax
from flax import nnx

from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, source_run, start_or_resume
from nanochat_jax.engine import Engine
from nanochat_jax.kernels import parse as parse_kernels
from nanochat_jax.model import GPTConfig, backend_settings
from nanochat_jax.optim import build_optimizer, lr_multiplier
from nanochat_jax.report import get_report, plot_metrics
from nanochat_jax.rl import QuestionBatches, longest_prompt, pass_at_k, rollout, score, train_on_rollouts
from nanochat_jax.sharding import compute_init, make_mesh
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.spellingbee import SpellingBee
from nanochat_jax.tokenizer import get_tokenizer
from nanochat_jax.train import (RunLog, add_finetune_flags, add_run_flags, finetune_lrs, make_train_step, peak_memory_bullet,
                                peak_memory_gib, stop_if_diverged)

parser = argparse.ArgumentParser(description="RL on GSM8K or SpellingBee")
parser.add_argument("--source", type=str, default="sft", choices=["base", "mid", "sft"], help="stage to start from")
parser.add_argument("--tag", type=str, default=None, help="run to start from, and this run's name (default: the source's latest)")
parser.add_argument("--step", type=int, default=None, help="source checkpoint step (default: the latest)")
parser.add_argument("--task", type=str, default="GSM8K", choices=["GSM8K", "SpellingBee"])
parser.add_argument("--tasks-dir", type=str, default=None, help="local GSM8K files (gzip JSON lines) instead of the hub")
parser.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: one epoch of the train split)")
parser.add_argument("--examples-per-step", type=int, default=16, help="questions per step")
parser.add_argument("--num-samples", type=int, default=16, help="completions per question")
parser.add_argument("--device-batch-size", type=int, default=32, help="rows per device per update micro-batch (memory only)")
parser.add_argument("--max-new-tokens", type=int, default=256)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--top-k", type=int, default=50)
parser.add_argument("--loss", type=str, default="nanochat", choices=["nanochat", "grpo"],
                    help="grpo: the advantage divided by its question's reward std (one update per rollout, so a clipped "
                         "ratio would always be 1 and is left out)")
parser.add_argument("--eval-every", type=int, default=60, help="steps between pass@k evals (-1: only at the end)")
parser.add_argument("--eval-examples", type=int, default=400, help="held-out questions for pass@k")
parser.add_argument("--eval-samples", type=int, default=8, help="samples per held-out question: pass@1..this")
add_finetune_flags(parser, init_lr_frac=0.05)  # LRs (default: the source run's) x 0.05, weight decay 0
add_run_flags(parser, "RL")  # checkpoints, resume, mesh, wandb, seed, --max-steps
parser.set_defaults(save_every=60)
args = parser.parse_args()
user_config = vars(args).copy()
master, print0 = compute_init()
if jax.process_count() > 1:
    sys.exit("chat_rl runs in one process (its rollouts decode on one device); use the GPUs of one host through --mesh")
mesh = make_mesh(args.mesh)
n_dev = jax.device_count()
tag, source_meta = source_run(args.source, args.tag, args.step)
config = GPTConfig(**source_meta["model_config"])
lrs = finetune_lrs(args, source_meta, user_config)
rows = args.examples_per_step * args.num_samples
micro_rows = args.device_batch_size * n_dev
if rows % micro_rows:
    sys.exit(f"{rows} rollouts a step ({args.examples_per_step} x {args.num_samples}) are not a multiple of device batch x devices = {micro_rows}")
run_dir = checkpoint_dir("rl", tag)
os.makedirs(run_dir, exist_ok=True)
print0(f"RL on {args.task} from {args.source} {tag} step {source_meta['step']} -> {run_dir}")
print0(f"{args.examples_per_step} questions x {args.num_samples} samples a step, updated in {rows // micro_rows} micro-batches of {micro_rows}")

tokenizer = get_tokenizer()
if args.task == "GSM8K":
    train_task, val_task = GSM8K("main", "train", tasks_dir=args.tasks_dir), GSM8K("main", "test", tasks_dir=args.tasks_dir)
else:  # the same sizes as GSM8K's splits; examples are drawn from their index, so any size gives the same first ones
    train_task, val_task = SpellingBee(size=7_473, split="train"), SpellingBee(size=1_319, split="test")
questions = QuestionBatches(len(train_task), args.examples_per_step)
num_iterations = args.num_iterations if args.num_iterations > 0 else questions.num_steps
if not 1 <= num_iterations <= questions.num_steps:
    sys.exit(f"{num_iterations} steps asked for, {args.task} train has {questions.num_steps} of {args.examples_per_step} questions")

schedule = dict(warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)  # 1 - step / num_iterations
tx = build_optimizer(config.n_embd, num_iterations, weight_decay=args.weight_decay, **lrs, **schedule)
checkpointer = Checkpointer(run_dir, keep=args.keep)
resuming = args.resume or args.resume_step is not None
loop = {"total_training_time": 0.0}
graphdef, state, step, loop = start_or_resume(checkpointer, args, (args.source, tag, args.step), config, tx, mesh, questions, loop,
                                              **backend_settings(), kernels=parse_kernels(args.kernels))
log = RunLog(run_dir, master, resumed_step=step if resuming else None, run=args.run, config=user_config)
train_step = make_train_step(graphdef, state, weighted=True)
engine = Engine(nnx.merge(graphdef, state)[0], tokenizer)  # its weights are refreshed from the state before every use
pad_id = tokenizer.encode_special("<|assistant_end|>")
sample = dict(temperature=args.temperature, top_k=args.top_k)
prompt_len = longest_prompt(tokenizer, train_task)  # every step's rollout shaped alike: compiled once


def refresh_engine():
    engine.load_weights(nnx.merge(graphdef, state)[0])


def evaluate_pass_at_k():
    """pass@1..eval_samples on the first --eval-examples held-out questions, sampled as in training."""
    refresh_engine()
    indices = range(min(args.eval_examples, len(val_task)))
    conversations, _, completions, _ = rollout(engine, tokenizer, val_task, indices, args.eval_samples, args.max_new_tokens,
                                               seed=10_000, **sample)
    return pass_at_k(score(val_task, tokenizer, conversations, completions), args.eval_samples)


def meta():
    return {"step": step, "num_iterations": num_iterations, "loop_state": loop, "seed": args.seed, "model_config": config.__dict__,
            "user_config": user_config, "max_seq_len": config.sequence_len, "task": args.task,
            "source": {"stage": args.source, "tag": tag, "step": source_meta["step"]}}


def every(n):
    return n > 0 and step % n == 0


# -----------------------------------------------------------------------------
# num_iterations + 1 passes: the last evaluates and saves

first_step = step
while True:
    last = step == num_iterations
    if last or every(args.eval_every):
        passk = evaluate_pass_at_k()
        loop.update({f"pass@{k}": v for k, v in passk.items()})
        log.write({"step": step, **{f"pass@{k}": v for k, v in passk.items()}})
        print0(f"step {step:05d} | " + " | ".join(f"pass@{k} {v:.4f}" for k, v in passk.items()))
    if (last or every(args.save_every)) and step > first_step:
        checkpointer.save(step, state, questions, meta())
    if last or step == args.max_steps:
        break

    state, f = train_on_rollouts(state, graphdef, train_step, engine, tokenizer, train_task, next(questions), mesh, micro_rows, pad_id,
                                 args.num_samples, args.max_new_tokens, seed=args.seed + step, normalize=args.loss == "grpo", prompt_len=prompt_len,
                                 **sample)
    stop_if_diverged(f["loss"], f["metrics"], step, checkpointer, run_dir)
    if step > first_step + 3:
        loop["total_training_time"] += f["dt"]  # the first steps include compilation
    lrm = lr_multiplier(step, num_iterations, **schedule)
    tok_per_sec = f["sampled_tokens"] / f["rollout_s"]
    print0(f"step {step:05d}/{num_iterations:05d} | reward {f['reward']:.4f} | loss {f['loss']:+.6f} | lrm {lrm:.3f} | "
           f"rollout {f['rollout_s']:.2f}s ({tok_per_sec:,.0f} tok/s) | score {f['score_s']:.2f}s | update {f['update_s']:.2f}s | L {f['seq_len']}")
    log.write({"step": step, "lrm": lrm, "rollout_tok_per_sec": tok_per_sec, **{k: v for k, v in f.items() if k != "metrics"}})
    step += 1

checkpointer.wait()
checkpointer.close()
print0(f"peak memory: {peak_memory_gib():.2f} GiB | total training time: {loop['total_training_time'] / 60:.2f}m")
if master and step == num_iterations:
    report = get_report()
    plot_metrics(log.path, os.path.join(report.dir, "chat_rl_curves.png"), title=f"RL on {args.task}", train_key="reward",
                 train_label="mean reward", val_key="pass@1", val_label="pass@1 (held out)")
    report.log("Chat RL", [user_config, {
        "Source checkpoint": f"{args.source} {tag} step {source_meta['step']}", "Task": args.task,
        "Number of iterations": num_iterations, "Rollouts per step": rows,
        **{f"pass@{k}": loop[f"pass@{k}"] for k in range(1, args.eval_samples + 1) if f"pass@{k}" in loop},
        "Total training time (m)": loop["total_training_time"] / 60, **peak_memory_bullet(),
    }, "![reward and pass@1](chat_rl_curves.png)"])
