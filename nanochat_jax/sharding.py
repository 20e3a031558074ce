"""
Device mesh and sharding: one mesh over all devices with axes ('data', 'fsdp', 'tensor'), and one
rules table that maps the logical axis names on parameters and activations onto it.
- batch: over data × fsdp (each device sees its own slice of the batch)
- parameters, and so the optimizer state: over fsdp (FSDP / ZeRO-3), plus tensor parallelism for
  the attention heads, the MLP hidden and the vocab when tensor > 1
Sizes come from a flag such as `--mesh data=2,fsdp=4`; an axis left out has size 1, and one axis
may be -1 to take the remaining devices (the default is data=-1: pure data parallel).
"""
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes
RULES = {
    "batch": ("data", "fsdp"),  # activations' batch dim
    "vocab": "tensor",  # lm_head (D, V): logits sharded over the vocab
    "vocab_rows": None,  # wte (V, D): a gather from a row-sharded table would make XLA replicate it
    "embed": "fsdp",  # the D dim of every weight matrix: FSDP
    "heads": "tensor",  # c_q (D, H·Dh), attn c_proj (H·Dh, D)
    "kv_heads": "tensor",  # c_k, c_v (D, K·Dh)
    "mlp": "tensor",  # c_fc (D, F), mlp c_proj (F, D)
    "act_heads": "tensor",  # q, k, v activations (B, T, H|K, Dh)
}


def parse_mesh(spec, num_devices):
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}, checked against the device count."""
    sizes = {axis: 1 for axis in MESH_AXES}
    given = set()
    for part in filter(None, (spec or "data=-1").split(",")):
        name, _, value = part.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ValueError(f"bad --mesh entry {part!r}: expected NAME=SIZE with NAME in {MESH_AXES}")
        sizes[name] = int(value)
        given.add(name)
    fill = [a for a in MESH_AXES if sizes[a] == -1]
    if len(fill) > 1:
        raise ValueError(f"--mesh {spec!r}: only one axis may be -1")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if fill:
        sizes[fill[0]] = num_devices // known
    if int(np.prod(list(sizes.values()))) != num_devices or min(sizes.values()) < 1:
        raise ValueError(f"--mesh {spec!r} gives {sizes}, which does not multiply out to the {num_devices} devices")
    return sizes


def make_mesh(spec=None, devices=None):
    """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all of them)."""
    devices = devices if devices is not None else jax.devices()
    sizes = parse_mesh(spec, len(devices))
    # Auto axes: XLA's sharding propagation places the collectives (GSPMD style)
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_spec(axes):
    return P(*(RULES.get(a) if a is not None else None for a in axes))


def constrain(x, *axes):
    """Pin an activation's sharding by logical axis names; a no-op when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(axes)))


def _is_var(x):
    from flax import nnx
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state, mesh):
    """NamedSharding for every leaf of an abstract nnx state: from its `axes` metadata, else replicated.
    Checks that each sharded dim divides by its mesh axes, and says which parameter does not."""
    def sharding(path, var):
        axes = var.get_metadata().get("axes") if _is_var(var) else None
        spec = logical_spec(axes) if axes else P()
        shape = var.shape if hasattr(var, "shape") else ()
        for dim, mesh_axes in zip(shape, spec):
            names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
            n = int(np.prod([mesh.shape[a] for a in names]))
            if dim % n:
                raise ValueError(f"{jax.tree_util.keystr(path)} of shape {shape} cannot be sharded as {spec} on mesh {dict(mesh.shape)}")
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(sharding, abstract_state, is_leaf=_is_var)


def batch_sharding(mesh, ndim=2, batch_axis=0):
    """Token arrays: the batch dim over data × fsdp, the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = RULES["batch"]
    return NamedSharding(mesh, P(*spec))


def global_batch(local_batch, mesh, batch_axis=0):
    """Assemble each process's slice of the batch (numpy) into one global jax.Array."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local_batch.ndim, batch_axis), local_batch)


def compute_init():
    """What every sharded stage does once its flags are parsed: the launcher's XLA settings (xla_env, before the
    backend starts), joining the process group, and (master, print0): is this process 0, and a print only it does."""
    from nanochat_jax import xla_env
    xla_env.configure()
    init_distributed()
    master = jax.process_index() == 0
    return master, (print if master else (lambda *a, **k: None))


def init_distributed():
    """Join a multi-process run when launched as one: JAX_NUM_PROCESSES > 1, JAX_PROCESS_ID, and
    JAX_COORDINATOR_ADDRESS (host:port of process 0). Must run before anything touches the backend."""
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 and not jax.distributed.is_initialized():
        if jax.config.jax_cpu_collectives_implementation is None:  # None: no cross-process collectives on CPU
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            initialization_timeout=int(os.environ.get("JAX_INIT_TIMEOUT", "300")),  # a peer that never starts
        )
