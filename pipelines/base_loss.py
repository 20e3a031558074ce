"""
Evaluate a base checkpoint: bits per byte on the train and val splits, and greedy samples; written
to the report.

python -m pipelines.base_loss                       # latest checkpoint of tag d20
python -m pipelines.base_loss --tag d4 --split-tokens 65536
"""
import argparse

import jax
from flax import nnx

from evals.bpb import evaluate_bpb
from nanochat_jax.checkpoint import restore_run
from nanochat_jax.dataloader import make_loader
from nanochat_jax.engine import sample_completions
from nanochat_jax.model import GPTConfig, backend_settings
from nanochat_jax.report import get_report
from nanochat_jax.sharding import compute_init, make_mesh
from nanochat_jax.tokenizer import get_tokenizer
from nanochat_jax.train import make_eval_step, peak_memory_bullet

parser = argparse.ArgumentParser(description="Train/val bpb and samples of a base checkpoint")
parser.add_argument("--tag", type=str, default="d20", help="run directory under base_checkpoints")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--split-tokens", type=int, default=20 * 524_288, help="tokens evaluated per split")
parser.add_argument("--device-batch-size", type=int, default=None, help="rows per device (default: the run's)")
parser.add_argument("--data-dir", type=str, default=None)
parser.add_argument("--mesh", type=str, default=None)
args = parser.parse_args()
_, print0 = compute_init()
mesh = make_mesh(args.mesh)
graphdef, state, meta = restore_run("base", args.tag, args.step, mesh, **backend_settings())
config = GPTConfig(**meta["model_config"])
T, rows = meta["max_seq_len"], (args.device_batch_size or meta["device_batch_size"]) * jax.local_device_count()
print0(f"base checkpoint {args.tag} step {meta['step']}: depth {config.n_layer}, width {config.n_embd}")

tokenizer = get_tokenizer()
eval_step = make_eval_step(graphdef, mesh)
results = {}
for split in ("train", "val"):
    loader = make_loader(tokenizer, rows, T, split, args.data_dir, process_index=jax.process_index(), process_count=jax.process_count())
    steps = max(1, args.split_tokens // (rows * T * jax.process_count()))
    results[f"{split}_bpb"] = evaluate_bpb(eval_step, state, loader, steps, tokenizer.token_bytes, mesh)
    print0(f"{split} bpb: {results[f'{split}_bpb']:.4f}")

forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)[0](ids))
samples = sample_completions(lambda ids: forward(state, ids), tokenizer)
for line in samples:
    print0(f"  sample: {line!r}")
get_report().log("Base model loss", [{"tag": args.tag, "step": meta["step"], **results, **peak_memory_bullet()}, "Samples:", *[f"- {s!r}" for s in samples]])
