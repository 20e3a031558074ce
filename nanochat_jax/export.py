"""
Export a training checkpoint for inference: the model params only (no optimizer state), in bf16 or
fp32, plus the tokenizer files and the model config. The engine and the chat server load exactly this.

python -m nanochat_jax.export --stage base --tag d20 --out /tmp/d20-export
python -m nanochat_jax.export --stage base --tag d4 --out /tmp/d4 --dtype float32 --step 200

DIR/params/     orbax checkpoint of the params (a plain nested dict)
DIR/tokenizer/  ranks.tiktoken, tokenizer.json, token_bytes.npy
DIR/config.json model config, dtype, and where it came from

load_model() is what the chat CLI and server call: an export directory, or a training checkpoint by
stage/tag/step (default: the most-trained stage that exists, and its most recent run).
"""
import argparse
import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from nanochat_jax.checkpoint import STAGES, find_run, restore_run
from nanochat_jax.model import GPT, GPTConfig, backend_settings
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tokenizer import Tokenizer, get_tokenizer


def restore_model(stage, tag, step=None, **model_kwargs):
    """(model, meta) from a training checkpoint: the params only, on one device."""
    graphdef, state, meta = restore_run(stage, tag, step, make_mesh("data=1", devices=jax.devices()[:1]), **model_kwargs)
    model, _ = nnx.merge(graphdef, state)
    return model, meta


def export(stage, tag, out, dtype="bfloat16", step=None):
    model, meta = restore_model(stage, tag, step)
    return save_export(model, get_tokenizer(), out, dtype, {"stage": stage, "tag": tag, "step": meta["step"]})


def save_export(model, tokenizer, out, dtype="bfloat16", source=None):
    """Write model's params, tokenizer and config as an export directory; source says where it came from."""
    params = jax.tree.map(lambda x: x.astype(dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tmp = out.rstrip("/") + ".tmp"  # written whole, then renamed: a crash never leaves half an export at `out`
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as saver:
        saver.save(os.path.join(os.path.abspath(tmp), "params"), params)
    tokenizer.save(os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"model_config": model.config.__dict__, "dtype": dtype, "source": source or {"stage": "?", "tag": "?", "step": 0}}, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def load_export(path, compute_dtype=jnp.float32, attn_impl="xla"):
    """(model, tokenizer, config dict) from an export directory; params keep their stored dtype."""
    with open(os.path.join(path, "config.json")) as f:
        info = json.load(f)
    config = GPTConfig(**info["model_config"])
    model = nnx.eval_shape(lambda: GPT(config, dtype=compute_dtype, attn_impl=attn_impl, rngs=nnx.Rngs(0)))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, info["dtype"]), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with ocp.StandardCheckpointer() as loader:
        params = loader.restore(os.path.join(os.path.abspath(path), "params"), target)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model, Tokenizer.from_directory(os.path.join(path, "tokenizer")), info


def load_model(checkpoint=None, stage=None, tag=None, step=None):
    """(model, tokenizer, description) for inference, in the backend's compute dtype: an export
    directory if given, else a training checkpoint found by find_run."""
    settings = backend_settings()
    if checkpoint:
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            raise FileNotFoundError(f"{checkpoint} is not an export directory (no config.json); write one with python -m nanochat_jax.export")
        model, tokenizer, info = load_export(checkpoint, settings["dtype"], settings["attn_impl"])
        return model, tokenizer, f"export {checkpoint} ({info['source']['stage']} {info['source']['tag']} step {info['source']['step']})"
    stage, tag = find_run(stage, tag)
    model, meta = restore_model(stage, tag, step, **settings)
    return model, get_tokenizer(), f"{stage} {tag} step {meta['step']}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Export a checkpoint for inference")
    parser.add_argument("--stage", type=str, default="base", choices=STAGES)
    parser.add_argument("--tag", type=str, required=True, help="run directory, e.g. d20")
    parser.add_argument("--step", type=int, default=None, help="default: the latest")
    parser.add_argument("--out", type=str, required=True, help="output directory")
    parser.add_argument("--dtype", type=str, default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    print(f"exported to {export(args.stage, args.tag, args.out, args.dtype, args.step)}")
