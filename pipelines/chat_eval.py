"""
Evaluate a chat model on nanochat v1's six tasks (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval,
SpellingBee) and report ChatCORE; written to the report as "Chat evaluation <source>".

python -m pipelines.chat_eval -i sft                          # every task, every problem
python -m pipelines.chat_eval -i mid -a GSM8K --max-problems 100
python -m pipelines.chat_eval -i sft -a ARC-Easy,MMLU --tasks-dir ../shared/data/tasks
python -m pipelines.chat_eval --checkpoint /tmp/d20-export -a all
"""
import argparse

from nanochat_jax import xla_env
from nanochat_jax.checkpoint import STAGES

parser = argparse.ArgumentParser(description="Chat evals and ChatCORE")
parser.add_argument("-i", "--source", type=str, default=None, choices=STAGES, help="training stage (default: the most-trained one)")
parser.add_argument("-g", "--tag", type=str, default=None, help="training run (default: the most recent)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--checkpoint", type=str, default=None, help="an export directory instead of a training run")
parser.add_argument("-a", "--task-name", type=str, default="all", help="'all' or comma-separated names: ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee")
parser.add_argument("-x", "--max-problems", type=int, default=None, help="first N problems of each task (default: all)")
parser.add_argument("-n", "--num-samples", type=int, default=1, help="completions per generative problem (pass@n)")
parser.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
parser.add_argument("-k", "--top-k", type=int, default=50)
parser.add_argument("-m", "--max-new-tokens", type=int, default=512)
parser.add_argument("--batch-size", type=int, default=256, help="rows decoded together (generative tasks)")
parser.add_argument("--batch-tokens", type=int, default=262_144, help="prompt tokens per forward pass (categorical tasks)")
parser.add_argument("--tasks-dir", type=str, default=None, help="local task data (gzip JSON lines) instead of the hub")
parser.add_argument("--self-check", action=argparse.BooleanOptionalAction, default=True,
                    help="held-out prompts: does the reply stop within 128 tokens, does it name the project")
args = parser.parse_args()
xla_env.configure()  # XLA flags, GPU memory fraction, compilation cache: before JAX starts

from evals.chat_eval import TASKS, evaluate_chat, self_checks  # noqa: E402
from nanochat_jax.engine import Engine  # noqa: E402
from nanochat_jax.export import load_model  # noqa: E402
from nanochat_jax.report import get_report  # noqa: E402
from nanochat_jax.train import peak_memory_bullet  # noqa: E402

names = list(TASKS) if args.task_name == "all" else [n for n in args.task_name.split(",") if n]  # "" : self checks only
unknown = [n for n in names if n not in TASKS]
if unknown:
    parser.error(f"unknown task(s) {unknown}; known: {list(TASKS)}")
model, tokenizer, description = load_model(args.checkpoint, args.source, args.tag, args.step)
print(f"chat eval of {description}: {', '.join(names)}")
engine = Engine(model, tokenizer)
out = evaluate_chat(model, engine, tokenizer, names, args.max_problems, args.tasks_dir, args.num_samples,
                    args.max_new_tokens, args.temperature, args.top_k, args.batch_size, args.batch_tokens)
if out["ChatCORE"] is not None:
    print(f"ChatCORE: {out['ChatCORE']:.4f}")
checks, examples = self_checks(engine, tokenizer) if args.self_check else ({}, [])
for name, value in checks.items():
    print(f"{name}: {value:.2f}")

source = description.split()[0] if not args.checkpoint else "export"  # base / mid / sft / rl
settings = {"model": description, "max_problems": args.max_problems, "num_samples": args.num_samples,
            "temperature": args.temperature, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
            **peak_memory_bullet()}
table = "| Task | Accuracy | Problems | Seconds |\n|---|---|---|---|\n" + "".join(
    f"| {n} | {out['results'][n]:.4f} | {out['problems'][n]} | {out['timings'][n]:.1f} |\n" for n in names)
summary = dict(out["results"], **({"ChatCORE": out["ChatCORE"]} if out["ChatCORE"] is not None else {}))
checks = {"Stops within 128 tokens (50 held-out prompts)": checks["stops"],
          "Names itself (20 held-out questions)": checks["names_itself"]} if checks else {}
replies = ["Held-out replies:", *[f"- {q!r} -> {a!r}" for q, a in examples]] if examples else []
get_report().log(f"Chat evaluation {source}", [settings, summary, checks, table, *replies])
