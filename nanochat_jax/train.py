"""
The jitted train and eval steps. The model and optimizer are split into (graphdef, state) once;
each step merges them inside the jit, so Python never walks the object graph per step, and the
state buffers are donated, so the update happens in place.

    graphdef, state = init_train_state(config, tx, mesh)
    step = make_train_step(graphdef, state)
    state, metrics = step(state, inputs, targets)   # (grad_accum, B, T) int32 each, -1 = ignore
"""
import json
import math
import os
import sys
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanochat_jax import kernels
from nanochat_jax.model import GPT
from nanochat_jax.report import PEAK_MEMORY
from nanochat_jax.sharding import batch_sharding, state_shardings


def _model_and_optimizer(config, tx, seed, **model_kwargs):
    model = GPT(config, rngs=nnx.Rngs(seed), **model_kwargs)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def abstract_train_state(config, tx, mesh, seed=0, **model_kwargs):
    """(graphdef, state of ShapeDtypeStructs carrying their shardings on mesh): the target for an init
    or a checkpoint restore. Call it outside `jax.set_mesh`: flax 0.12's eval_shape fails on the
    abstract mesh that context installs."""
    abstract = nnx.eval_shape(lambda: _model_and_optimizer(config, tx, seed, **model_kwargs))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)  # one NamedSharding per Variable
    def with_sharding(sharding, var):
        if not hasattr(var, "shape"):  # e.g. optax's empty MaskedNode placeholders
            return var
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding))
    abstract_state = jax.tree.map(with_sharding, shardings, abstract_state)
    return graphdef, abstract_state


def init_train_state(config, tx, mesh, seed=0, **model_kwargs):
    """Build model and optimizer directly sharded on the mesh: the init runs inside a jit whose
    outputs are sharded, so no device ever holds an unsharded copy. Call it outside `jax.set_mesh`."""
    graphdef, abstract_state = abstract_train_state(config, tx, mesh, seed, **model_kwargs)
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    state = jax.jit(lambda: nnx.state(_model_and_optimizer(config, tx, seed, **model_kwargs)), out_shardings=shardings)()
    return graphdef, state


def shard_state(model, tx, mesh):
    """(graphdef, state) for an existing model (e.g. with imported weights), placed on the mesh."""
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    return graphdef, jax.device_put(state, state_shardings(state, mesh))


def make_train_step(graphdef, state, weighted=False):
    """One optimizer step over grad_accum micro-batches, accumulated inside the jit. No host sync:
    the metrics come back as device arrays. Arrays are (grad_accum, rows, T). The loss is each micro-batch's
    mean over its targets (-1 = ignore), the gradient their mean; weighted=True (RL) takes a third array of
    per-token weights and minimises sum(weights x token losses) over the whole step (the weights carry the
    normalisation)."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    mesh = jax.tree.leaves(shardings)[0].mesh

    @partial(jax.jit, donate_argnums=0, out_shardings=(shardings, None))
    def train_step(state, inputs, targets, *weights):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # so the model's sharding constraints apply
            return _train_step(state, inputs, targets, *weights)

    def _train_step(state, inputs, targets, *weights):
        model, optimizer = nnx.merge(graphdef, state)
        batch = tuple(jax.lax.with_sharding_constraint(a, batch_sharding(mesh, ndim=3, batch_axis=1)) for a in (inputs, targets, *weights))

        model_def, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, x, y, w=None):  # (B, T) each
            model = nnx.merge(model_def, params, rest)
            return model(x, y, weights=w)

        def micro_step(grad_sum, xyw):
            loss, grads = jax.value_and_grad(loss_fn)(params, *xyw)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, losses = jax.lax.scan(micro_step, zeros, batch)
        n = 1 if weighted else inputs.shape[0]  # weighted: the sum is the objective; else the mean over micro-batches
        grads = jax.tree.map(lambda g: g / n, grad_sum)
        optimizer.update(model, grads)
        new_params = jax.tree.leaves(nnx.state(model, nnx.Param))
        finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in new_params]))  # one cheap pass: never save NaN params
        metrics = {"loss": losses.sum() if weighted else losses.mean(), "grad_norm": optax.tree.norm(grads), "params_finite": finite}
        return nnx.state((model, optimizer)), metrics

    return train_step


def make_eval_step(graphdef, mesh):
    """Per-token loss (B, T) of inputs -> targets (-1 = ignore), e.g. for bits per byte. Under the state's mesh,
    as in the train step: the model's sharding constraints apply and each device computes its own rows' loss."""
    @jax.jit
    def eval_step(state, inputs, targets):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            model, _ = nnx.merge(graphdef, state)
            return model(inputs, targets, loss_reduction="none")
    return eval_step


# -----------------------------------------------------------------------------
# What every training loop (base, mid, SFT, RL) keeps besides the state: metrics.jsonl, wandb, the NaN stop

def add_run_flags(parser, what):
    """The flags every post-training stage shares with base_train: checkpoints and resuming, mesh, wandb, seed,
    the Pallas kernels."""
    parser.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    parser.add_argument("--resume", action="store_true", help=f"continue from the latest {what} checkpoint")
    parser.add_argument("--resume-step", type=int, default=None)
    parser.add_argument("--fallback", action="store_true", help="if a checkpoint is unreadable, move it aside and use the previous one")
    parser.add_argument("--mesh", type=str, default=None, help="e.g. data=2,fsdp=4")
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy': no wandb)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this step without finishing (tests, timing)")
    kernels.add_flag(parser)


def add_finetune_flags(parser, init_lr_frac):
    """The LR flags of a stage that starts from another run's checkpoint (mid, SFT, RL): each LR defaults to
    that run's, and all of them are scaled by --init-lr-frac."""
    parser.add_argument("--embedding-lr", type=float, default=None, help="default: the source run's")
    parser.add_argument("--unembedding-lr", type=float, default=None, help="default: the source run's")
    parser.add_argument("--matrix-lr", type=float, default=None, help="Muon (default: the source run's)")
    parser.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="every LR times this")
    parser.add_argument("--weight-decay", type=float, default=0.0)


def finetune_lrs(args, source_meta, user_config):
    """The optimizer's LRs for a fine-tuning stage: the flags, else the source run's (written into user_config
    resolved, so the next stage finds them in this run's meta), times --init-lr-frac."""
    names = ("embedding_lr", "unembedding_lr", "matrix_lr")
    resolved = {k: getattr(args, k) if getattr(args, k) is not None else source_meta["user_config"][k] for k in names}
    user_config.update(resolved)
    return {k: v * args.init_lr_frac for k, v in resolved.items()}


class RunLog:
    """metrics.jsonl (one JSON row per step; also to wandb if a run name is given) and the EMA of the train
    loss, on the master process. A fresh run starts the file over; a resumed one drops the rows the
    interrupted run logged at or after the step it resumes from, so the file never holds a step twice."""

    def __init__(self, run_dir, master, resumed_step=None, run="dummy", config=None, project="nanochat_jax"):
        self.path, self.master, self.wandb = os.path.join(run_dir, "metrics.jsonl"), master, None
        if master and os.path.exists(self.path):
            rows = [line for line in open(self.path) if resumed_step is not None and json.loads(line)["step"] < resumed_step]
            with open(self.path, "w") as f:
                f.writelines(rows)
        if run != "dummy" and master:
            try:
                import wandb
                self.wandb = wandb.init(project=project, name=run, config=config)
            except ImportError:
                print("wandb is not installed: logging to metrics.jsonl only")

    def write(self, row):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.wandb:
                self.wandb.log(row, step=row["step"])


def smooth_loss(loop, loss, step, beta=0.9):
    """Fold loss into loop['smooth_train_loss'] (an EMA) and return it debiased, as Adam debiases its moments."""
    loop["smooth_train_loss"] = beta * loop["smooth_train_loss"] + (1 - beta) * loss
    return loop["smooth_train_loss"] / (1 - beta ** (step + 1))


def stop_if_diverged(loss, metrics, step, checkpointer, run_dir):
    """Exit without saving when the loss or the updated params are not finite: the last good checkpoint stays."""
    if math.isfinite(loss) and bool(metrics["params_finite"]):
        return
    checkpointer.wait()
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the update made some parameters NaN or inf"
    sys.exit(f"step {step}: {what}; stopping without saving. The last good checkpoint is kept in {run_dir}")


def peak_memory_gib():
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30


def peak_memory_bullet():
    """The report sections' peak-memory entry: GiB, or '-' where the device keeps no memory stats (CPU)."""
    return {PEAK_MEMORY: peak_memory_gib() or "-"}
