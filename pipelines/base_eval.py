"""
CORE of a base checkpoint (evals/core.py): one line per task, nanochat's CSV in
$NANOCHAT_JAX_HOME/base_eval/base_model_<step>.csv, and the report's "Base model evaluation".

python -m pipelines.base_eval --tag d20                                  # latest checkpoint; bundle downloaded once
python -m pipelines.base_eval --tag d4 --max-per-task 16 --eval-bundle ../shared/data/eval_bundle.zip
python -m pipelines.base_eval --checkpoint /tmp/d20-export               # an export directory
python -m pipelines.base_eval --random-init --depth 20 --eval-bundle B   # timing: random weights, nothing written
python -m pipelines.base_eval --download-only                            # fetch nanochat's bundle and stop

Scores from the offline stand-in bundle (shared/data/eval_bundle.zip) are called CORE-offline.
"""
import argparse
import os

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from evals.core import BATCH_TOKENS, Bundle, default_bundle, evaluate_core, markdown_table, write_csv
from nanochat_jax.common import get_base_dir
from nanochat_jax.model import GPT, backend_settings, config_for_depth
from nanochat_jax.report import get_report
from nanochat_jax.sharding import compute_init, make_mesh
from nanochat_jax.tokenizer import get_tokenizer
from nanochat_jax.train import peak_memory_bullet

parser = argparse.ArgumentParser(description="CORE metric of a base checkpoint")
parser.add_argument("--tag", type=str, default="d20", help="run directory under base_checkpoints")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--checkpoint", type=str, default=None, help="an export directory instead of a training checkpoint")
parser.add_argument("--random-init", action="store_true", help="random weights at --depth, for timing (writes no CSV or report)")
parser.add_argument("--depth", type=int, default=20, help="with --random-init")
parser.add_argument("--max-per-task", type=int, default=-1, help="items per task (-1: all)")
parser.add_argument("--tasks", type=str, default=None, help="comma-separated task labels (default: all 22)")
parser.add_argument("--eval-bundle", type=str, default=None, help="bundle zip or directory (default: $NANOCHAT_JAX_HOME/eval_bundle, downloaded)")
parser.add_argument("--download-only", action="store_true", help="download nanochat's bundle (if missing) and stop")
parser.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS, help="tokens per batch (rows x padded length), over all devices")
parser.add_argument("--whole-sequences", action="store_true", help="run every sequence whole (no shared prefixes), for comparison")
parser.add_argument("--mesh", type=str, default=None, help="e.g. data=8 (default: data parallel over all devices)")
args = parser.parse_args()
if args.download_only:
    try:
        print(f"eval bundle: {default_bundle()}")
    except FileNotFoundError as e:
        raise SystemExit(f"base_eval: {e}") from None
    raise SystemExit(0)

master, print0 = compute_init()
mesh = make_mesh(args.mesh)
settings = backend_settings()
try:
    bundle = Bundle(args.eval_bundle or default_bundle())  # before the model: a missing bundle fails fast
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"base_eval: {e}") from None


def replicated(model):
    """The model with its params copied to every device of the mesh."""
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
    return model


def random_weights(config):
    """A GPT with every parameter drawn N(0, 0.02²), in one jitted call: nanochat's init has zero output
    projections, and matmuls on zeros run faster than on real weights."""
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0), **settings))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    draw = jax.jit(lambda key: [jax.random.normal(k, x.shape, x.dtype) * 0.02 for k, x in zip(jax.random.split(key, len(leaves)), leaves)])
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, draw(jax.random.key(0))))


if args.random_init:
    tokenizer = get_tokenizer()
    model = replicated(random_weights(config_for_depth(args.depth, vocab_size=max(65536, tokenizer.get_vocab_size()))))
    step, name = None, f"random weights d{args.depth} (vocabulary {model.config.vocab_size:,})"
elif args.checkpoint:
    from nanochat_jax.export import load_export  # imported only here: checkpoints pull in orbax and grain
    model, tokenizer, info = load_export(args.checkpoint, settings["dtype"], settings["attn_impl"])
    model = replicated(model)
    source = info["source"]
    step, name = source["step"], f"export {args.checkpoint} ({source['stage']} {source['tag']} step {source['step']})"
else:
    from nanochat_jax.checkpoint import restore_run  # imported only here: checkpoints pull in orbax and grain
    graphdef, state, meta = restore_run("base", args.tag, args.step, mesh, **settings)  # laid out on the mesh
    model, tokenizer = (graphdef, state), get_tokenizer()
    step, name = meta["step"], f"base {args.tag} step {meta['step']}"
print0(f"model: {name}")

out = evaluate_core(model, tokenizer, bundle, max_per_task=args.max_per_task, batch_tokens=args.batch_tokens,
                    mesh=mesh, share_prefix=not args.whole_sequences, labels=args.tasks.split(",") if args.tasks else None)
core = f"{out['core']:.4f}" + (f" ({out['bundle']})" if out["bundle"] != "CORE" else "")
print0(f"{name}: CORE {core}")
if step is not None and master:
    path = write_csv(os.path.join(get_base_dir(), "base_eval", f"base_model_{step:06d}.csv"), out)
    print0(f"wrote {path}")
    get_report().log("Base model evaluation", [{
        "Model": name, "Bundle": f"{out['bundle']} ({out['bundle_path']})",
        "Items per task": "all" if args.max_per_task <= 0 else args.max_per_task,
        "Examples": sum(out["examples"].values()), "Time (s)": out["seconds"], "CORE": core, **peak_memory_bullet(),
    }, markdown_table(out)])
