"""
Training checkpoints with orbax, one CheckpointManager per run, under
$NANOCHAT_JAX_HOME/<stage>_checkpoints/<tag>/<step>/ with three items:
  state  model params and optimizer state (sharded arrays; restorable onto any mesh)
  data   the data loader's state (grain's checkpoint handler, one small JSON per process)
  meta   JSON: step, loop state (EMA loss, min val bpb, time), seed, model config, the run's flags
Saves are asynchronous and atomic: orbax writes a temporary directory and renames it when complete,
so a crash mid-save leaves the previous checkpoints as they were. The last `keep` are kept.
"""
import os
import shutil
import time

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from nanochat_jax.common import get_base_dir
from nanochat_jax.model import GPTConfig
from nanochat_jax.optim import build_optimizer
from nanochat_jax.train import abstract_train_state, shard_state


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read back."""


STAGES = ("base", "mid", "sft", "rl")


def find_run(stage=None, tag=None):
    """(stage, tag) of a training run: the latest stage that has checkpoints unless given, and its most
    recently written run unless given."""
    for s in ([stage] if stage else reversed(STAGES)):
        root = os.path.join(get_base_dir(), f"{s}_checkpoints")
        tags = [t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))] if os.path.isdir(root) else []
        if tag is not None:
            if tag in tags:
                return s, tag
            if stage:
                raise FileNotFoundError(f"no run {tag!r} in {root} (have: {sorted(tags)})")
        elif tags:
            return s, max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)))
    raise FileNotFoundError(f"no {stage or 'training'} checkpoints{f' tagged {tag!r}' if tag else ''} under {get_base_dir()}; "
                            f"train one first (python -m pipelines.base_train) or pass an export directory")


def checkpoint_dir(stage, tag):
    return os.path.join(get_base_dir(), f"{stage}_checkpoints", tag)


class Checkpointer:
    def __init__(self, directory, keep=2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def refuse_existing(self):
        """A fresh run must start in an empty directory: orbax would keep the old run's steps and skip the new ones."""
        if self.latest_step() is not None:
            raise CheckpointError(f"{self.directory} already holds checkpoints (latest step {self.latest_step()}): "
                                  "pass --resume to continue that run, or move the directory aside to start over")

    def save(self, step, state, loader, meta):
        """Start writing a checkpoint; returns once the arrays are copied off the devices."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                                  data=grain.checkpoint.CheckpointSave(loader),
                                  meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args)

    def restore(self, step, abstract_state, loader=None, fallback=False):
        """(state, meta) of `step` (None: the latest), laid out as abstract_state says (its shardings
        decide the mesh), and the loader (if given) set to where it was. A checkpoint that cannot be read
        raises CheckpointError, or with fallback=True is moved aside and the previous one is tried."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (have: {sorted(steps)})")
            steps = [step]
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        for s in steps:
            try:
                return self._restore(s, abstract_state, loader)
            except Exception as e:  # orbax and tensorstore raise many types for damaged files
                problem = f"checkpoint step {s} in {self.directory} is unreadable ({type(e).__name__}: {str(e)[:300]})"
                if not fallback:
                    raise CheckpointError(problem + "; pass --fallback to resume from the previous good one") from None
                aside = os.path.join(self.directory, f"corrupt-{s}-{int(time.time())}")
                shutil.move(os.path.join(self.directory, str(s)), aside)  # so a later save of step s cannot collide
                self.manager.reload()
                print(f"WARNING: {problem}; moved it to {aside} and trying the previous checkpoint")
        raise CheckpointError(f"no readable checkpoint left in {self.directory}")

    def _restore(self, step, abstract_state, loader):
        items = dict(state=ocp.args.StandardRestore(nnx.to_pure_dict(abstract_state)), meta=ocp.args.JsonRestore())
        if loader is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(loader)
        args = ocp.args.Composite(**items)
        restored = self.manager.restore(step, args=args)
        state = jax.tree.map(lambda x: x, abstract_state)  # a copy: replace_by_pure_dict fills it in place
        nnx.replace_by_pure_dict(state, restored.state)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            if isinstance(leaf, jax.ShapeDtypeStruct):
                raise CheckpointError(f"checkpoint step {step} has no value for {jax.tree_util.keystr(path)}")
        return state, restored.meta

    def read_meta(self, step=None):
        """The JSON meta of a step (default: the latest), without touching the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def restore_run(stage, tag, step, mesh, **model_kwargs):
    """(graphdef, state, meta) of a run's checkpoint (step None: the latest) laid out on mesh, for evaluation
    or inference: the optimizer state comes along (the checkpoint holds it) but nothing steps it."""
    checkpointer = Checkpointer(checkpoint_dir(stage, tag))
    meta = checkpointer.read_meta(step)
    config = GPTConfig(**meta["model_config"])
    tx = build_optimizer(config.n_embd, num_iterations=None)  # only to shape the optimizer state
    graphdef, abstract_state = abstract_train_state(config, tx, mesh, **model_kwargs)
    state, meta = checkpointer.restore(meta["step"], abstract_state)
    checkpointer.close()
    return graphdef, state, meta


def restore_for_finetune(stage, tag, step, tx, mesh, **model_kwargs):
    """(graphdef, state, meta): the params of a run's checkpoint with a fresh optimizer tx (momenta zero, step
    count 0, so its schedules start over), laid out on mesh. How midtraining starts from base, and SFT from mid."""
    graphdef, state, meta = restore_run(stage, tag, step, mesh, **model_kwargs)
    model, _ = nnx.merge(graphdef, state)
    graphdef, state = shard_state(model, tx, mesh)
    return graphdef, state, meta


def source_run(stage, tag=None, step=None):
    """(tag, meta) of the run a post-training stage starts from (tag None: the stage's latest run; step None: its
    latest checkpoint), reading only the meta."""
    _, tag = find_run(stage, tag)
    return tag, Checkpointer(checkpoint_dir(stage, tag)).read_meta(step)


def start_or_resume(checkpointer, args, source, config, tx, mesh, loader, loop, **model_kwargs):
    """(graphdef, state, step, loop) of a post-training run: with --resume (or --resume-step) its own checkpoint,
    the loader set to where it was; else the source run's params, source = (stage, tag, step), with a fresh tx."""
    if args.resume or args.resume_step is not None:
        graphdef, abstract_state = abstract_train_state(config, tx, mesh, args.seed, **model_kwargs)
        state, meta = checkpointer.restore(args.resume_step, abstract_state, loader, fallback=args.fallback)
        if jax.process_index() == 0:
            print(f"resumed from step {meta['step']}")
        return graphdef, state, meta["step"], meta["loop_state"]
    checkpointer.refuse_existing()
    graphdef, state, _ = restore_for_finetune(*source, tx, mesh, **model_kwargs)
    return graphdef, state, 0, loop
