"""
Benchmarks that print figures (no timed unit tests). Random tokens, the real model and optimizer.

python -m nanochat_jax.bench train --depth 20 --device-batch-size 32          # one GPU
python -m nanochat_jax.bench train --depth 4 --device-batch-size 2 --seq-len 256 --steps 3   # CPU smoke run
python -m nanochat_jax.bench data --data-dir DIR --threads 1,2                  # loader tokens/s

train: the full step (fwd, bwd, Muon + AdamW) at nanochat's shapes; prints compile time, median
step time, tokens/s, MFU against 989 TF/s per GPU (H100 bf16 dense, as nanochat) and peak memory.
On GPU it first checks that cuDNN and XLA attention agree.
kernels: each Pallas kernel (nanochat_jax.kernels) against its plain-JAX twin at a depth's shapes, and the mlp GEMM's
tile sizes; NVIDIA GPUs only.
python -m nanochat_jax.bench kernels --depth 20
data: the pretraining loader alone (read parquet, tokenize, pack), tokens/s for each thread count.
decode: the KV-cache engine: time to first token, per-step latency, tokens/s and MBU per batch size, for the
host loop (Engine.generate, streaming) and the device loop (Engine.generate_batch, one lax.while_loop).
python -m nanochat_jax.bench decode --depth 20 --batch-sizes 1,8,32,128 --loop both
serve: the chat server in-process on random weights under web.loadtest: one streaming client's tokens/s after its
first token, then many clients at once (requests/s, TTFT p50/p99, prefill groups and decode batch sizes).
python -m nanochat_jax.bench serve --depth 20 --clients 1,64
evals: the full CORE bundle and the full ChatCORE (all six tasks, every problem) on random weights, timed per
task, with the tokenizer in $NANOCHAT_JAX_HOME/tokenizer. Compiles are included. (With nanochat's init every
row decodes the same greedy chain, so decode times say little about a trained model's.)
python -m nanochat_jax.bench evals --depth 20 --eval-bundle ../shared/data/eval_bundle.zip --tasks-dir ../shared/data/tasks
rl: chat_rl's step on random weights: the rollout of 16 x 16 samples on the device loop (tokens/s), the scoring,
and the weighted update, each timed, with the tokenizer in $NANOCHAT_JAX_HOME/tokenizer (or --tokenizer-dir) and
GSM8K's train prompts from --tasks-dir (else SpellingBee's). Random weights never stop, so every row decodes all
--max-new-tokens: the rollout's worst case.
python -m nanochat_jax.bench rl --depth 20 --tasks-dir ../shared/data/tasks
"""
import argparse
import os
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import xla_env
from nanochat_jax import engine as engine_module
from nanochat_jax.engine import Engine
from nanochat_jax.kernels import DECODE_ATTENTION_ROWS, DECODE_BLOCK, DECODE_DOTS, DECODE_GEMV_ROWS, DECODE_PREFETCH, DECODE_PREFETCH_WEIGHTS, DECODE_STAGES, DECODE_WARPS, GEMV_PROGRAMS, GEMV_TILE, GEMV_WARPS, add_flag as add_kernels_flag, parse as parse_kernels
from nanochat_jax.model import backend_settings, config_for_depth
from nanochat_jax.optim import build_optimizer
from nanochat_jax.scheduler import Scheduler
from nanochat_jax.sharding import global_batch, make_mesh
from nanochat_jax.train import init_train_state, make_train_step, peak_memory_gib

PEAK_FLOPS = 989e12  # H100 SXM bf16 dense, nanochat's MFU denominator


def attention_agreement():
    """Max |cuDNN − XLA| causal attention on random bf16 inputs at a d20-like GQA shape."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (4, 2048, 8, 128), jnp.bfloat16)
    k, v = (jax.random.normal(key, (4, 2048, 4, 128), jnp.bfloat16) for key in (kk, kv))
    out = {impl: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl).astype(jnp.float32)
           for impl in ("cudnn", "xla")}
    return float(jnp.abs(out["cudnn"] - out["xla"]).max())


def bench_train(args):
    on_gpu = jax.default_backend() == "gpu"
    config = config_for_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    mesh = make_mesh(args.mesh)
    n_dev = jax.device_count()
    B, T, A = args.device_batch_size * n_dev, args.seq_len, args.grad_accum
    tx = build_optimizer(config.n_embd, num_iterations=1000)
    dtype, attn_impl = backend_settings()["dtype"], args.attn or backend_settings()["attn_impl"]
    print(f"{jax.devices()[0].device_kind} x{n_dev}, jax {jax.__version__}, mesh {dict(mesh.shape)}")
    if on_gpu:
        print(f"attention check: max |cudnn - xla| = {attention_agreement():.4f} (bf16)")
    graphdef, state = init_train_state(config, tx, mesh, dtype=dtype, attn_impl=attn_impl, remat=args.remat, fp8=args.fp8, kernels=parse_kernels(args.kernels))
    model_params = sum(x.size for x in jax.tree.leaves(state[0]))  # state = (model, optimizer)
    flops_per_token = 6 * (model_params - config.vocab_size * config.n_embd) + 12 * config.n_layer * config.n_head * config.head_dim * T
    print(f"d{args.depth}: {model_params:,} params, D={config.n_embd}, H={config.n_head}, T={T}, "
          f"batch {B}x{T}x{A} = {B * T * A:,} tokens/step, {flops_per_token / 1e9:.3f} GFLOP/token, remat={args.remat}, fp8={args.fp8}, kernels={args.kernels}, attn={attn_impl}")

    rng = np.random.default_rng(0)
    def batch():
        tokens = rng.integers(0, config.vocab_size, (A, B, T + 1), dtype=np.int32)
        return global_batch(tokens[..., :-1], mesh, batch_axis=1), global_batch(tokens[..., 1:], mesh, batch_axis=1)

    step = make_train_step(graphdef, state)
    x, y = batch()
    t0 = time.perf_counter()
    compiled = step.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.steps):
        x, y = batch()
        t0 = time.perf_counter()
        state, metrics = compiled(state, x, y)
        loss = float(metrics["loss"])  # syncs: one step's wall time
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tok_per_s = B * T * A / dt
    mfu = flops_per_token * tok_per_s / (PEAK_FLOPS * n_dev)
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0) / 2**30
    print(f"compile {compile_s:.1f}s | step median {dt * 1000:.1f} ms (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, "
          f"{len(times)} steps) | {tok_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | peak mem {peak:.1f} GiB | last loss {loss:.3f}")
    if args.parts:
        time_parts(graphdef, state, x, y)
    if args.profile:
        def one_step():
            nonlocal state
            state, metrics = compiled(state, x, y)
            return metrics["loss"]
        print_profile(one_step, args.profile)


def median_time(f, n=5):
    """Median wall time of f() over n calls after one warm-up call, each synced."""
    jax.block_until_ready(f())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_parts(graphdef, state, x, y):
    """The step's two halves on their own: forward + backward of one micro-batch, and the optimizer update."""
    from flax import nnx

    @jax.jit
    def grads(state, x, y):
        model, _ = nnx.merge(graphdef, state)
        return nnx.grad(lambda m: m(x, y))(model)

    @jax.jit
    def update(state, g):
        model, optimizer = nnx.merge(graphdef, state)
        optimizer.update(model, g)
        return nnx.state(model, nnx.Param)  # the new params only: the old state stays valid for the next call

    g = grads(state, x[0], y[0])
    t_grad = median_time(lambda: grads(state, x[0], y[0]))
    t_update = median_time(lambda: update(state, g))
    print(f"parts: fwd+bwd {t_grad * 1000:.1f} ms | optimizer update {t_update * 1000:.1f} ms")


# kernel name -> category, first match wins (cuBLAS/CUTLASS GEMMs, cuDNN attention, NCCL, XLA's own fusions)
KERNEL_KINDS = [("attention", ("cudnn", "fmha", "flash", "sdpa")), ("nccl", ("nccl",)),
                ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas")), ("copy/memset", ("memcpy", "memset", "copy")),
                ("triton", ("triton",)), ("fusion/other", ("",))]


def print_profile(fn, out_dir, n=3, top=15):
    """Trace n calls of fn and print the GPU time per kernel category and the top kernels, per call."""
    import collections
    import glob
    jax.block_until_ready(fn())
    with jax.profiler.trace(out_dir):
        for _ in range(n):
            jax.block_until_ready(fn())
    data = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True))[-1])
    kernels = collections.Counter()
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    for ev in line.events:
                        kernels[ev.name] += ev.duration_ns / 1e6 / n
    by_kind = collections.Counter()
    for name, ms in kernels.items():
        by_kind[next(kind for kind, keys in KERNEL_KINDS if any(k in name.lower() for k in keys))] += ms
    total = sum(kernels.values())
    launches = sum(1 for plane in data.planes if plane.name.startswith("/device:GPU") for line in plane.lines
                   if line.name.startswith("Stream") for _ in line.events) / n
    print(f"profile: {total:.3f} ms of GPU kernels per call, {launches:.0f} kernels (trace in {out_dir})")
    for kind, ms in by_kind.most_common():
        print(f"  {kind:14s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    for name, ms in kernels.most_common(top):
        print(f"  {ms:8.3f} ms  {name[:110]}")


MLP_TILE_CHOICES = [dict(bm=bm, bn=bn, bk=bk, num_warps=w, num_stages=st) for bm, bn, bk, w, st in
                    [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                     (128, 256, 32, 8, 4), (64, 256, 64, 4, 4)]]


ROPE_ROW_CHOICES = [None, 8, 16, 32]  # kernels.rope_qk_norm's tokens per program (None: one head per program)


def bench_kernels(args):
    """Each Pallas kernel against its plain-JAX twin at a depth's training shapes, forward and forward + backward
    (xent's kernel is both at once), then the mlp GEMM at several tile sizes. Timed on NVIDIA GPUs; under
    NANOCHAT_JAX_PALLAS_INTERPRET=1 the same code runs in the interpreter (a smoke run: its times mean nothing)."""
    from nanochat_jax import kernels
    mode = kernels.mode()
    if mode is None:
        raise SystemExit("bench kernels: the Pallas kernels run only on NVIDIA GPUs (compute capability 8.0+)")
    interpret = mode == "interpret"
    config = config_for_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    M, D, H, Dh, V = args.device_batch_size * args.seq_len, config.n_embd, config.n_head, config.head_dim, config.vocab_size
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (M, D), jnp.bfloat16)
    w = (jax.random.normal(k[1], (D, 4 * D)) / D ** 0.5).astype(jnp.bfloat16)
    q = jax.random.normal(k[2], (M, H, Dh), jnp.bfloat16)
    angles = jax.random.uniform(k[3], (M, Dh // 2), maxval=6.0)
    cos, sin = jnp.cos(angles).astype(jnp.bfloat16), jnp.sin(angles).astype(jnp.bfloat16)
    C = min(M, 2**28 // V)  # model._chunked's chunk of the loss
    z = (jax.random.normal(k[4], (C, V)) * 5).astype(jnp.bfloat16)
    t, weights = jax.random.randint(k[5], (C,), 0, V), jnp.ones((C,), jnp.float32)

    def with_grad(f):  # forward + backward of sum(f(...)), the gradient of the first argument
        return jax.jit(jax.grad(lambda first, *rest: f(first, *rest).astype(jnp.float32).sum()))
    cases = [("mlp_up", (x, w), lambda x, w: kernels.mlp_up_reference(x, w, kernels.rms_scale(x)),
              lambda x, w: kernels.mlp_up(x, w, kernels.rms_scale(x), interpret))]
    cases += [(f"rope_qk_norm, rows {rows}", (q, cos, sin), kernels.rope_qk_norm_reference,
               partial(kernels.rope_qk_norm, interpret=interpret, rows=rows)) for rows in ROPE_ROW_CHOICES]
    print(f"d{args.depth}: {M:,} rows, D={D}, H={H}, Dh={Dh}, loss chunk {C}x{V}")
    for name, inputs, plain, fused in cases:
        ms = [1000 * median_time(lambda: f(*inputs), args.steps) for f in
              (jax.jit(plain), jax.jit(fused), with_grad(plain), with_grad(fused))]
        print(f"{name:22s} forward: plain {ms[0]:.3f} ms, kernel {ms[1]:.3f} ms | forward + backward: plain {ms[2]:.3f} ms, kernel {ms[3]:.3f} ms")
    xent = (jax.jit(kernels.xent_reference), jax.jit(lambda *a: kernels.xent_chunk(*a, interpret)))
    ms = [1000 * median_time(lambda: f(z, t, weights), args.steps) for f in xent]
    print(f"{'xent_chunk':22s} loss + logit gradient of one chunk: plain {ms[0]:.3f} ms, kernel {ms[1]:.3f} ms")
    r = kernels.rms_scale(x)
    for tiles in MLP_TILE_CHOICES:
        if not kernels.mlp_up_supported(M, D, 4 * D, tiles):
            continue
        up = jax.jit(partial(kernels._mlp_up_call, interpret=interpret, tiles=tiles))
        ms = 1000 * median_time(lambda: up(x, w, r), args.steps)
        print(f"mlp_up tiles {tiles}: {ms:.3f} ms, {2 * M * D * 4 * D / ms / 1e9:.0f} TF/s")


def bench_data(args):
    from nanochat_jax.dataloader import make_loader
    from nanochat_jax.tokenizer import Tokenizer, get_tokenizer
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer()
    print(f"{os.cpu_count()} CPUs, vocab {tokenizer.get_vocab_size():,}, batch {args.batch_size}x{args.seq_len}, mode {args.mode}")
    for threads in map(int, args.threads.split(",")):
        loader = make_loader(tokenizer, args.batch_size, args.seq_len, data_dir=args.data_dir, mode=args.mode, threads=threads)
        for _ in range(args.warmup):
            next(loader)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        dt = time.perf_counter() - t0
        print(f"threads {threads}: {args.batches * args.batch_size * args.seq_len / dt:,.0f} tokens/s ({dt / args.batches * 1000:.1f} ms/batch)")


def add_decode_kernel_flags(p):
    """The engine's device loop and decode kernels (kernels.py; NVIDIA GPUs), for decode and serve."""
    p.add_argument("--check-every", type=int, default=Engine.CHECK_EVERY,
                   help="device-loop steps between reads of its condition (Engine.CHECK_EVERY)")
    p.add_argument("--top-k-fast", type=int, default=engine_module.TOP_K_FAST,
                   help="sampling's candidates for a top-k up to this (engine.TOP_K_FAST)")
    p.add_argument("--top-k-chunk", type=int, default=engine_module.TOP_K_CHUNK, help="their chunk of the vocabulary (engine.TOP_K_CHUNK)")
    p.add_argument("--decode-kernel-rows", type=int, default=DECODE_ATTENTION_ROWS,
                   help="attention over the cache by kernels.decode_attention from this many rows up (0 always, -1 never)")
    p.add_argument("--decode-gemv-rows", type=int, default=DECODE_GEMV_ROWS,
                   help="batches of at most this many rows decode in five kernels a layer (kernels.decode_linear; 0 never)")
    p.add_argument("--gemv-tile", type=int, default=GEMV_TILE, help="kernels.decode_linear's tile, in elements")
    p.add_argument("--gemv-programs", type=int, default=GEMV_PROGRAMS, help="kernels.decode_linear's least number of programs")
    p.add_argument("--gemv-weights-first", action="store_true", help="kernels.decode_linear loads its weight tiles before x")
    p.add_argument("--gemv-warps", type=int, default=GEMV_WARPS, help="kernels.decode_linear's warps per program")
    p.add_argument("--decode-block", type=int, default=DECODE_BLOCK, help="kernels.decode_attention's keys per loop step")
    p.add_argument("--decode-warps", type=int, default=DECODE_WARPS, help="kernels.decode_attention's warps per program")
    p.add_argument("--decode-stages", type=int, default=DECODE_STAGES, help="kernels.decode_attention's pipeline stages")
    p.add_argument("--decode-dots", type=int, default=int(DECODE_DOTS),
                   help="kernels.decode_attention's scores and output as tensor-core dots (1) or CUDA-core sums (0)")
    p.add_argument("--decode-prefetch", type=int, default=DECODE_PREFETCH,
                   help="programs beside the five-kernel path's attention that read the next weights into L2 (0: none)")
    p.add_argument("--decode-prefetch-weights", type=int, default=DECODE_PREFETCH_WEIGHTS,
                   help="how many of the attention c_proj, c_fc, the MLP c_proj and the next layer's QKV they read")


def set_decode_kernels(args):
    from nanochat_jax import kernels
    kernels.DECODE_ATTENTION_ROWS = None if args.decode_kernel_rows < 0 else args.decode_kernel_rows
    kernels.DECODE_GEMV_ROWS, kernels.GEMV_TILE, kernels.GEMV_PROGRAMS = args.decode_gemv_rows, args.gemv_tile, args.gemv_programs
    kernels.GEMV_WEIGHTS_FIRST, kernels.DECODE_BLOCK, kernels.GEMV_WARPS = args.gemv_weights_first, args.decode_block, args.gemv_warps
    kernels.DECODE_WARPS, kernels.DECODE_STAGES = args.decode_warps, args.decode_stages
    kernels.DECODE_PREFETCH, kernels.DECODE_PREFETCH_WEIGHTS = args.decode_prefetch, args.decode_prefetch_weights
    kernels.DECODE_DOTS = bool(args.decode_dots)
    Engine.CHECK_EVERY = args.check_every
    engine_module.TOP_K_FAST, engine_module.TOP_K_CHUNK = args.top_k_fast, args.top_k_chunk


def bench_decode(args):
    """Time to first token, per-step latency, tokens/s and MBU of the KV-cache engine (random weights),
    sampling at temperature 1 with top-k 50 (the chat default).
    host: Engine.generate, streaming: TTFT is the time to the first yield (prefill and first sample), the step
          the time from the first yield to the last over the tokens between (yields come a device-loop chunk at a time).
    device: Engine.generate_batch, the whole decode in one lax.while_loop; only the total is observable, so
          the step is (total - prefill) / steps, both medians, with the prefill (Engine._start) timed on its own."""
    from flax import nnx
    from nanochat_jax.model import GPT
    from nanochat_jax.tokenizer import Tokenizer
    set_decode_kernels(args)
    config = config_for_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.max_len)
    model = GPT(config, dtype=backend_settings()["dtype"], rngs=nnx.Rngs(0))
    engine = Engine(model, Tokenizer.placeholder(args.vocab_size))
    engine.STREAM_CHUNK = args.stream_chunk or engine.STREAM_CHUNK
    itemsize = jnp.dtype(model.dtype).itemsize
    param_bytes = sum(x.size * x.dtype.itemsize for x in engine.state[:engine.n_leaves])  # the fused QKV copies are read instead of these
    table_bytes = config.vocab_size * config.n_embd * itemsize  # a step reads only B rows of the embedding table
    kv_bytes_per_token = config.n_layer * 2 * config.n_kv_head * config.head_dim * jnp.dtype(engine.cache_dtype).itemsize
    loops = ["host", "device"] if args.loop == "both" else [args.loop]
    print(f"{jax.devices()[0].device_kind}: d{args.depth}, {param_bytes / 1e9:.2f} GB of weights ({(param_bytes - table_bytes) / 1e9:.2f} GB "
          f"read per step besides embedding rows), prompt {args.prompt_len}, {args.steps} steps, temperature {args.temperature}, "
          f"top-k {args.top_k}, peak bandwidth {args.peak_bw / 1e12:.2f} TB/s, loops {'+'.join(loops)}")
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, args.prompt_len)]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, seed=0)

    def mbu(B, step):
        context = args.prompt_len + args.steps / 2  # mean tokens in the cache while decoding
        return (param_bytes - table_bytes + B * config.n_embd * itemsize + B * context * kv_bytes_per_token) / step / args.peak_bw

    def report(loop, B, ttft, step, note=""):
        print(f"{loop:6s} batch {B:4d} | TTFT {ttft * 1000:7.1f} ms | step {step * 1000:6.2f} ms | {B / step:10,.0f} tok/s "
              f"| MBU {100 * mbu(B, step):5.1f}%{note}", flush=True)

    for B in map(int, args.batch_sizes.split(",")):
        if "host" in loops:
            t_compile = time.perf_counter()
            for rep in range(2):  # the first pass compiles
                t0 = time.perf_counter()
                stamps = []
                for _column in engine.generate(prompt, num_samples=B, max_tokens=args.steps, **sampling):
                    stamps.append(time.perf_counter())  # each yield has synced on its tokens
                if rep == 0:
                    compile_s = time.perf_counter() - t_compile
            ttft, step = stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # tokens come a chunk at a time
            report("host", B, ttft, step, f" | {len(stamps)} tokens/row, first pass (compiles) {compile_s:.1f}s")
        if "device" in loops:
            t0 = time.perf_counter()
            engine.generate_batch(prompt, num_samples=B, max_tokens=args.steps, **sampling)  # compiles
            compile_s = time.perf_counter() - t0
            cache_len = engine.cache_len(len(prompt), args.steps)
            prefill = median_time(lambda: engine._start(prompt, B, args.temperature, args.top_k, 1.0, 0,  # generate_batch's prefill, alone
                                                        cache_len=cache_len, static_mode=True)[:3], n=3)
            results, _ = engine.generate_batch(prompt, num_samples=B, max_tokens=args.steps, **sampling)
            total = median_time(lambda: engine.generate_batch(prompt, num_samples=B, max_tokens=args.steps, **sampling)[0], n=3)
            steps = max(len(r) for r in results)
            steps += steps < args.steps  # every row stopped early: count the stop token too
            # medians of separate calls: on a tiny model the decode can be inside the prefill's noise
            how = "(total - prefill) / steps" if total > prefill else "total / steps (the decode is within the prefill's noise)"
            report("device", B, prefill, (total - prefill if total > prefill else total) / steps,
                   f" | {steps} tokens/row in {total * 1000:.1f} ms (median); TTFT = prefill alone, step = {how}, first call (compiles) {compile_s:.1f}s")
        if args.profile:  # the GPU kernels of one decode step (what both loops run per token)
            cache_len = engine.cache_len(len(prompt), args.steps)
            first, k, v, seeds, rows, knobs, mode = engine._start(prompt, B, args.temperature, args.top_k, 1.0, 0,
                                                                  cache_len=cache_len, static_mode=True)
            pos = np.full(B, len(prompt), np.int32)
            cache = [k, v]
            step_args = lambda: (engine.state, first, *cache, pos, seeds, rows, pos, *knobs)  # pos doubles as the token index
            static = dict(window=engine.bucket(len(prompt) + 1), mode=mode)

            def one_step():
                token, cache[0], cache[1] = engine._step(*step_args(), **static)
                return token
            print_profile(one_step, os.path.join(args.profile, f"batch{B}"), n=10, top=args.profile_top)
            hlo = engine._step.lower(*step_args(), **static).compile().as_text()
            with open(os.path.join(args.profile, f"step_batch{B}.hlo.txt"), "w") as f:  # names the profile's fusions
                f.write(hlo)


SERVE_UNTIMED = 4  # bench serve's most untimed runs per client count


def run_loadtest(command):
    """web.loadtest's report (stdout) of one run."""
    import subprocess
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"web.loadtest failed ({run.returncode}): {run.stderr[-2000:]}")
    return run.stdout


def bench_serve(args):
    """The chat server (web.server's app over a Scheduler) in this process on random weights, driven by
    web.loadtest in a process of its own (its client threads would otherwise take the server's interpreter lock
    for every token they parse): one streaming client (its tokens/s after the first token), then --clients at once
    (requests/s, TTFT p50/p99, the prefill groups and decode batches the scheduler formed). Random weights rarely
    sample a stop token, so every reply runs to --max-tokens."""
    import logging
    import threading
    from flax import nnx
    from werkzeug.serving import make_server
    from nanochat_jax.model import GPT
    from nanochat_jax.tokenizer import Tokenizer
    from web.server import create_app
    config = config_for_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.max_len)
    model = GPT(config, dtype=backend_settings()["dtype"], rngs=nnx.Rngs(0))
    tokenizer = Tokenizer.placeholder(args.vocab_size)
    t0 = time.perf_counter()
    set_decode_kernels(args)
    scheduler = Scheduler(Engine(model, tokenizer), slots=args.slots, warmup=args.warmup, prefill_rows=args.prefill_rows, chunk=args.chunk)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = make_server("127.0.0.1", 0, create_app(scheduler, tokenizer, max_tokens=args.max_tokens), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scheduler.ready.wait()
    print(f"{jax.devices()[0].device_kind}: d{args.depth}, {args.slots} slots, prefills of up to {args.prefill_rows}, rounds of up to {args.chunk} steps, "
          f"ready in {time.perf_counter() - t0:.1f} s; {args.max_tokens} tokens per reply, temperature {args.temperature}")
    url = f"http://127.0.0.1:{server.server_port}"
    # a burst splits into prefill groups of varying sizes, so a run can meet a shape the runs before it did not: count
    # the compiles, untimed runs go on until one compiles nothing (at most SERVE_UNTIMED), and a timed line says its own
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration" else None)
    try:
        for clients in map(int, args.clients.split(",")):
            load = [sys.executable, "-m", "web.loadtest", "--url", url, "--clients", str(clients), "--max-tokens", str(args.max_tokens),
                    "--temperature", str(args.temperature)]
            for untimed in range(1, SERVE_UNTIMED + 1):
                n = len(compiles)
                run_loadtest(load)
                if len(compiles) == n:
                    break
            for _ in range(args.repeats):
                before, n, t0 = scheduler.snapshot(), len(compiles), time.perf_counter()
                out = run_loadtest(load)
                after, wall = scheduler.snapshot(), time.perf_counter() - t0
                d = {name: after[name] - before[name] for name in ("rounds", "steps", "round_s", "prefill_s")}
                print(f"{clients:3d} clients: " + out.strip().replace("\n", " | ") +
                      f" | scheduler: {d['rounds']} rounds, {d['steps']} steps, {d['round_s'] * 1000 / max(d['steps'], 1):.2f} ms a step "
                      f"in rounds, prefills {d['prefill_s']:.2f} s, rounds {d['round_s']:.2f} s of {wall:.2f} s | "
                      f"compiled in the run: {len(compiles) - n} ({sum(compiles[n:]):.1f} s) after {untimed} untimed", flush=True)
    finally:
        server.shutdown()
        scheduler.close()


def bench_evals(args):
    from flax import nnx
    from evals.chat_eval import evaluate_chat
    from evals.core import evaluate_core
    from nanochat_jax.model import GPT
    from nanochat_jax.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    config = config_for_depth(args.depth, vocab_size=tokenizer.get_vocab_size())  # a larger vocab would sample ids it cannot decode
    model = GPT(config, **backend_settings(), rngs=nnx.Rngs(0))
    print(f"{jax.devices()[0].device_kind}: d{args.depth} random weights, vocab {config.vocab_size:,}, {model.num_params():,} params")
    totals = {}
    if "core" in args.what_evals:
        t0 = time.perf_counter()
        out = evaluate_core(model, tokenizer, args.eval_bundle, max_per_task=args.max_per_task)
        totals["CORE"] = time.perf_counter() - t0
        print(f"CORE {out['core']:.4f} over {sum(out['examples'].values()):,} examples in {totals['CORE']:.1f}s")
    if "chat" in args.what_evals:
        t0 = time.perf_counter()
        out = evaluate_chat(model, Engine(model, tokenizer), tokenizer, max_problems=args.max_problems, tasks_dir=args.tasks_dir,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        totals["ChatCORE"] = time.perf_counter() - t0
        print(f"ChatCORE {out['ChatCORE']} over {sum(out['problems'].values()):,} problems in {totals['ChatCORE']:.1f}s")
    print("totals (compiles included): " + ", ".join(f"{k} {v:.1f}s" for k, v in totals.items()))


def bench_rl(args):
    from flax import nnx
    from nanochat_jax.rl import QuestionBatches, longest_prompt, train_on_rollouts
    from nanochat_jax.tasks.gsm8k import GSM8K
    from nanochat_jax.tasks.spellingbee import SpellingBee
    from nanochat_jax.tokenizer import Tokenizer, get_tokenizer
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer()
    config = config_for_depth(args.depth, vocab_size=tokenizer.get_vocab_size())  # a larger vocab would sample ids it cannot decode
    E, N = args.examples_per_step, args.num_samples
    tx = build_optimizer(config.n_embd, args.warmup + args.steps, warmdown_ratio=1.0)
    mesh = make_mesh(args.mesh)
    graphdef, state = init_train_state(config, tx, mesh, **backend_settings())
    train_step = make_train_step(graphdef, state, weighted=True)
    task = GSM8K("main", "train", tasks_dir=args.tasks_dir) if args.tasks_dir else SpellingBee(size=7_473, split="train")
    engine, questions = Engine(nnx.merge(graphdef, state)[0], tokenizer), QuestionBatches(len(task), E)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    rows, prompt_len = E * N, longest_prompt(tokenizer, task)
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}: d{args.depth} random weights, {type(task).__name__} prompts, "
          f"{E} x {N} = {rows} rollouts of up to {args.max_new_tokens} tokens, update micro-batches of {args.device_batch_size}")
    figures = []
    for s in range(args.warmup + args.steps):
        state, f = train_on_rollouts(state, graphdef, train_step, engine, tokenizer, task, next(questions), mesh, args.device_batch_size,
                                     pad_id, N, args.max_new_tokens, args.temperature, args.top_k, seed=s, prompt_len=prompt_len)
        tok_per_sec = f["sampled_tokens"] / f["rollout_s"]
        figures.append((f["rollout_s"], tok_per_sec, f["score_s"], f["update_s"], f["dt"]))
        print(f"step {s}{' (warm-up: compiles)' if s < args.warmup else ''} | rollout {f['rollout_s']:.3f}s, {f['sampled_tokens']:,} tokens, "
              f"{tok_per_sec:,.0f} tok/s | score {f['score_s']:.3f}s | update {f['update_s']:.3f}s (L {f['seq_len']}) | step {f['dt']:.3f}s",
              flush=True)
    med = [statistics.median(f[i] for f in figures[args.warmup:]) for i in range(5)]
    print(f"median of {args.steps} steps: rollout {med[0]:.3f}s ({med[1]:,.0f} tok/s) | score {med[2]:.3f}s | update {med[3]:.3f}s | "
          f"step {med[4]:.3f}s | peak mem {peak_memory_gib():.2f} GiB")


parser = argparse.ArgumentParser(description="nanochat_jax benchmarks")
sub = parser.add_subparsers(dest="what", required=True)
p = sub.add_parser("train", help="full train step at a given depth")
p.add_argument("--depth", type=int, default=20)
p.add_argument("--device-batch-size", type=int, default=32, help="sequences per device per micro-step")
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
p.add_argument("--vocab-size", type=int, default=65536)
p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
p.add_argument("--mesh", type=str, default=None, help="e.g. data=2,fsdp=4 (default: data over all devices)")
p.add_argument("--remat", action="store_true", help="recompute each block in the backward pass (saves memory)")
p.add_argument("--fp8", action="store_true", help="the blocks' matmuls as FP8 GEMMs (base_train --fp8)")
add_kernels_flag(p)  # base_train's --kernels, same default
p.add_argument("--attn", type=str, default=None, choices=["cudnn", "xla"], help="attention backend (default: cudnn on GPU)")
p.add_argument("--parts", action="store_true", help="also time fwd+bwd and the optimizer update on their own")
p.add_argument("--profile", type=str, default=None, metavar="DIR", help="trace 3 steps into DIR and print GPU time by kernel kind")

p = sub.add_parser("kernels", help="each Pallas kernel against the plain path, and the mlp GEMM's tiles (NVIDIA GPUs)")
p.add_argument("--depth", type=int, default=20)
p.add_argument("--device-batch-size", type=int, default=32)
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--vocab-size", type=int, default=65536)
p.add_argument("--steps", type=int, default=10, help="timed calls (median reported)")

p = sub.add_parser("data", help="pretraining loader throughput")
p.add_argument("--data-dir", type=str, default=None, help="parquet shards (default: downloaded, else embedded)")
p.add_argument("--tokenizer-dir", type=str, default=None, help="default: $NANOCHAT_JAX_HOME/tokenizer")
p.add_argument("--threads", type=str, default="1,2", help="comma-separated thread counts to try")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--mode", type=str, default="stream", choices=["stream", "bestfit"])
p.add_argument("--batches", type=int, default=30, help="timed batches")
p.add_argument("--warmup", type=int, default=3)

p = sub.add_parser("decode", help="KV-cache engine decoding")
p.add_argument("--depth", type=int, default=20)
p.add_argument("--batch-sizes", type=str, default="1,8,32,128", help="samples decoded together")
p.add_argument("--prompt-len", type=int, default=128)
p.add_argument("--steps", type=int, default=128, help="tokens generated per sample")
p.add_argument("--max-len", type=int, default=2048, help="KV cache positions")
p.add_argument("--vocab-size", type=int, default=65536)
p.add_argument("--peak-bw", type=float, default=3.35e12, help="bytes/s for MBU (H100 SXM HBM3: 3.35 TB/s)")
p.add_argument("--loop", type=str, default="both", choices=["host", "device", "both"],
               help="host: Engine.generate (streaming); device: Engine.generate_batch (one lax.while_loop)")
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--top-k", type=int, default=50, help="the chat default")
p.add_argument("--profile", type=str, default=None, metavar="DIR", help="trace 10 decode steps per batch size into DIR, print GPU time by kernel")
p.add_argument("--profile-top", type=int, default=15, help="kernels listed by --profile")
add_decode_kernel_flags(p)
p.add_argument("--stream-chunk", type=int, default=None, help="the host loop's device-loop steps per call (default Engine.STREAM_CHUNK)")

p = sub.add_parser("serve", help="the chat server under web.loadtest, on random weights")
p.add_argument("--depth", type=int, default=20)
p.add_argument("--vocab-size", type=int, default=65536)
p.add_argument("--max-len", type=int, default=2048, help="KV cache positions")
p.add_argument("--slots", type=int, default=Scheduler.SLOTS, help="web.server --slots")
p.add_argument("--prefill-rows", type=int, default=Scheduler.PREFILL_ROWS, help="web.server --prefill-rows")
p.add_argument("--chunk", type=int, default=Scheduler.CHUNK, help="web.server --chunk: most decode steps per round")
p.add_argument("--clients", type=str, default="1,64", help="comma-separated client counts, each run on its own")
p.add_argument("--max-tokens", type=int, default=128)
p.add_argument("--temperature", type=float, default=0.8)
p.add_argument("--repeats", type=int, default=3, help="timed runs per client count")
p.add_argument("--warmup", action="store_true", help="compile every shape first, as web.server does (minutes at d20); without it "
               "untimed bursts before each client count compile the shapes they meet, until one compiles nothing")
add_decode_kernel_flags(p)

p = sub.add_parser("evals", help="full CORE and ChatCORE on random weights, timed per task")
p.add_argument("--depth", type=int, default=20)
p.add_argument("--what-evals", type=str, default="core,chat", help="core, chat or both")
p.add_argument("--eval-bundle", type=str, default=None, help="CORE bundle zip or directory (default: downloaded)")
p.add_argument("--max-per-task", type=int, default=-1)
p.add_argument("--tasks-dir", type=str, default=None, help="chat task data (default: the hub)")
p.add_argument("--max-problems", type=int, default=None)
p.add_argument("--max-new-tokens", type=int, default=512)
p.add_argument("--batch-size", type=int, default=256, help="rows decoded together")

p = sub.add_parser("rl", help="chat_rl's step: rollout, scoring and update, timed")
p.add_argument("--depth", type=int, default=20)
p.add_argument("--tokenizer-dir", type=str, default=None, help="default: $NANOCHAT_JAX_HOME/tokenizer")
p.add_argument("--tasks-dir", type=str, default=None, help="GSM8K's local files (default: SpellingBee prompts)")
p.add_argument("--examples-per-step", type=int, default=16)
p.add_argument("--num-samples", type=int, default=16)
p.add_argument("--max-new-tokens", type=int, default=256)
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--top-k", type=int, default=50)
p.add_argument("--device-batch-size", type=int, default=32, help="rows per update micro-batch")
p.add_argument("--mesh", type=str, default=None)
p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
p.add_argument("--warmup", type=int, default=2)

if __name__ == "__main__":
    args = parser.parse_args()
    if args.what != "data":
        print(f"xla_env: {xla_env.configure()}")  # the launcher's flags, so the figures are the training run's
    {"train": bench_train, "kernels": bench_kernels, "data": bench_data, "decode": bench_decode, "serve": bench_serve, "evals": bench_evals, "rl": bench_rl}[args.what](args)
