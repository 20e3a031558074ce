"""
The XLA flags and environment that every entry point sets before JAX starts its backend, plus the
persistent compilation cache. A value the user already set always wins. What is set, and why
(measured on one H100 at d20, batch 32; docs/performance.md has the figures):

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92       JAX takes 75% of GPU memory by default; d20 at batch 32
                                              peaks at 66 GiB, over the 60 GiB that leaves on 80 GB
    --xla_gpu_enable_triton_gemm=false        cuBLAS for every matmul: 1.4% faster step, 1/3 less compile
    --xla_gpu_enable_latency_hiding_scheduler=true
                                              overlap the FSDP/data collectives with compute on >1 GPU
    jax_compilation_cache_dir=$NANOCHAT_JAX_HOME/xla_cache
                                              a second run loads its compiled steps from disk

An XLA flag that the installed jaxlib does not know aborts the process, so each flag carries the
first jaxlib version known to accept it. The flags are harmless on the CPU backend.
"""
import os

from nanochat_jax.common import get_base_dir

# (flag, value, first jaxlib version that accepts it)
XLA_FLAGS = [
    ("--xla_gpu_enable_triton_gemm", "false", (0, 4, 30)),
    ("--xla_gpu_enable_latency_hiding_scheduler", "true", (0, 4, 30)),
]
ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}


def _jaxlib_version():
    from importlib.metadata import version
    return tuple(int(part) for part in version("jaxlib").split(".")[:3] if part.isdigit())


def configure(cache_dir=None):
    """Set the flags and environment above (call before the first JAX computation; later calls only
    set the cache) and turn on the persistent compilation cache. Returns what was set, for logs."""
    import jax
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        print("xla_env.configure(): JAX's backend is already running, so its flags and memory fraction stay as they were")
    applied = {}
    for name, value in ENV.items():
        if name not in os.environ:
            os.environ[name] = applied[name] = value
    flags = os.environ.get("XLA_FLAGS", "")
    have = {f.split("=")[0] for f in flags.split()}
    jaxlib = _jaxlib_version()
    new = [f"{flag}={value}" for flag, value, since in XLA_FLAGS if flag not in have and jaxlib >= since]
    if new:
        os.environ["XLA_FLAGS"] = applied["XLA_FLAGS"] = " ".join([flags, *new]).strip()
    cache_dir = cache_dir or os.environ.get("NANOCHAT_JAX_XLA_CACHE") or os.path.join(get_base_dir(), "xla_cache")
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        applied["jax_compilation_cache_dir"] = cache_dir
    return applied
