"""
Generation.
- greedy_naive: the reference, recomputing the full forward pass at every step (no cache)
- Engine: prefill once, then decode over a preallocated KV cache with per-row positions, sampling
  (temperature, top-k, top-p, seeded), and nanochat's calculator tool forced into the stream.
  generate_batch() runs the decode loop on the device (lax.while_loop) and returns to the host only when a
  row calls the calculator; generate() streams the same loop's tokens a chunk of steps at a time.
The chat server's continuous batching (nanochat_jax.scheduler) drives prefill/insert and the device loop in
rounds of a few steps over rows that started apart, and gives each request the same tokens.
"""
from collections import deque
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.calculator import calculate

# nanochat's fixed prompts for the greedy samples printed during and after pretraining
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def greedy_naive(forward, prompts, max_tokens, stop_ids=()):
    """Greedy continuations of several prompts (lists of ids) at once. forward: a model, or a jitted
    forward(ids (B, L)) -> logits (B, L, V). All prompts sit left-aligned in one fixed (B, L) buffer, so there
    is one compile; causal attention keeps what lies after each row's cursor from mattering. A row stops at a
    stop id (not included) or after max_tokens."""
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    buf = np.zeros((B, lengths.max() + max_tokens), np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    out, done = [[] for _ in range(B)], np.zeros(B, bool)
    pick = lambda logits, cur: jnp.argmax(logits[jnp.arange(B), cur - 1], axis=-1)
    if isinstance(forward, nnx.Module):  # its weights go in as arguments: a jit closing over them would bake
        graphdef, state = nnx.split(forward)  # them into the program as constants (2.2 GB at d20, minutes to compile)
        step = jax.jit(lambda state, ids, cur: pick(nnx.merge(graphdef, state)(ids), cur))
        next_token = lambda ids, cur: step(state, ids, cur)
    else:
        next_token = lambda ids, cur: pick(forward(ids), cur)
    for k in range(max_tokens):
        cur = lengths + k
        tokens = np.asarray(next_token(buf, cur))  # syncs: the host decides what to feed next
        for i in range(B):
            if done[i]:
                continue
            if int(tokens[i]) in stop_ids:
                done[i] = True
            else:
                out[i].append(int(tokens[i]))
                buf[i, cur[i]] = tokens[i]
        if done.all():
            break
    return out


def sample_completions(forward, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """Each prompt (after <|bos|>) with its greedy continuation, as text."""
    bos = tokenizer.get_bos_token_id()
    outs = greedy_naive(forward, [tokenizer.encode(p, prepend=bos) for p in prompts], max_tokens)
    return [p + tokenizer.decode(o) for p, o in zip(prompts, outs)]


# -----------------------------------------------------------------------------
# Sampling

# A top-k up to TOP_K_FAST draws from that many candidates, found by top_candidates over chunks of TOP_K_CHUNK; one up
# to TOP_K_WIDE from that many, by chunks of TOP_K_WIDE_CHUNK; a larger k, or top-p without top-k, sorts all V logits.
# One H100, 65,536 logits, the candidates alone: 64 by chunks of 32 35-42 us, 256 by 16 68-85 us, lax.top_k 78-649 us
# (batch 1-128); a d20 step at batch 1 0.79 ms with 64 candidates against 0.82 with 256
TOP_K_FAST, TOP_K_CHUNK = 64, 32
TOP_K_WIDE, TOP_K_WIDE_CHUNK = 256, 16


def row_keys(seeds, rows, steps):
    """One PRNG key per row: (seed, sample index, token index). A row's draws never depend on which other
    rows share its batch, so a seeded request gives the same text alone, batched, or on the device loop."""
    key = lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t)
    return jax.vmap(key)(seeds, rows, steps)


def top_candidates(logits, n, chunk=None):
    """lax.top_k(logits, n) for logits (B, V), but without sorting all V: the n chunks of `chunk` logits (default
    TOP_K_CHUNK) with the largest maxima hold the n largest logits, so only those n * chunk are ranked. The same
    values; ids the same too, except which of several equal logits is taken at the cut. (XLA ranks a whole
    row of 65,536 by a radix sort: 0.6 ms a step at batch 128 on an H100.)"""
    B, V = logits.shape
    chunk = chunk or TOP_K_CHUNK
    C = V // chunk
    if V % chunk or C < 4 * n:
        return jax.lax.top_k(logits, n)
    blocks = logits.reshape(B, C, chunk)
    _, chunks = jax.lax.top_k(blocks.max(axis=-1), n)
    chunks = jnp.sort(chunks, axis=-1)  # in vocabulary order, so equal logits rank by id as in lax.top_k
    candidates = jnp.take_along_axis(blocks, chunks[:, :, None], axis=1).reshape(B, n * chunk)
    values, j = jax.lax.top_k(candidates, n)
    return values, jnp.take_along_axis(chunks, j // chunk, axis=1) * chunk + j % chunk


def _sample_sorted(values, ids, keys, temperature, top_k, top_p):
    """Sample from candidates sorted largest first: values (B, C) logits, ids (B, C) their token ids."""
    rank = jnp.arange(values.shape[-1])[None, :]
    values = jnp.where((top_k[:, None] > 0) & (rank >= top_k[:, None]), -jnp.inf, values)  # keep the k largest
    scaled = values / jnp.maximum(temperature, 1e-6)[:, None]
    probs = jax.nn.softmax(scaled, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the candidates ranked above
    scaled = jnp.where((top_p[:, None] < 1.0) & (before >= top_p[:, None]), -jnp.inf, scaled)  # nucleus: smallest set with mass >= top_p
    choice = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def sampling_mode(temperature, top_k, top_p):
    """Which path of sample_next serves every row of these per-row knobs (B,): 0 all greedy, 1 plain
    categorical, 2 the top TOP_K_FAST candidates, 3 those and plain rows, 4 a sort of all V logits, 5 and 6 as 2
    and 3 with TOP_K_WIDE candidates. Numpy knobs give an int (the host's choice); traced knobs a traced one
    (the device's)."""
    xp = np if isinstance(temperature, np.ndarray) else jnp
    hot = temperature > 0
    plain_rows = (top_k == 0) & (top_p >= 1.0)
    needs_all = xp.any(hot & (((top_k == 0) & (top_p < 1.0)) | (top_k > TOP_K_WIDE)))
    wide = xp.any(hot & (top_k > TOP_K_FAST))
    any_plain, all_plain = xp.any(hot & plain_rows), xp.all(~hot | plain_rows)
    few = xp.where(any_plain, 3, 2) + xp.where(wide, 3, 0)
    mode = xp.where(~xp.any(hot), 0, xp.where(needs_all, 4, xp.where(all_plain, 1, few)))
    return int(mode) if xp is np else mode


def sample_next(logits, keys, temperature, top_k, top_p, mode=None):
    """One token per row from fp32 logits (B, V); keys (B,) and per-row knobs (B,): temperature 0 is
    greedy, top_k 0 and top_p 1 are off. The knobs are traced, so changing them never recompiles.
    Takes the cheapest path that serves every row (sampling_mode): chosen on the device by a lax.switch,
    or, given a static mode, at trace time. A switch makes XLA copy its index to the host and wait for it,
    so a step that contains one cannot be queued ahead of the device."""
    B, V = logits.shape
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = temperature > 0
    plain_rows = (top_k == 0) & (top_p >= 1.0)  # neither top-k nor top-p: categorical over all V

    def plain():
        return jax.vmap(jax.random.categorical)(keys, logits / jnp.maximum(temperature, 1e-6)[:, None]).astype(jnp.int32)

    def few(with_plain, n=TOP_K_FAST, chunk=TOP_K_CHUNK):  # a row's draw is the same over n candidates or more
        values, ids = top_candidates(logits, min(n, V), chunk)
        sampled = _sample_sorted(values, ids, keys, temperature, top_k, top_p).astype(jnp.int32)
        return jnp.where(plain_rows, plain(), sampled) if with_plain else sampled

    def all_sorted():  # plain rows draw as they do alone: a draw over sorted logits would give another token
        order = jnp.argsort(-logits, axis=-1)
        sampled = _sample_sorted(jnp.take_along_axis(logits, order, axis=-1), order, keys, temperature, top_k, top_p).astype(jnp.int32)
        return jnp.where(plain_rows, plain(), sampled)

    wide = lambda with_plain: few(with_plain, TOP_K_WIDE, TOP_K_WIDE_CHUNK)
    branches = [lambda: greedy, plain, lambda: few(False), lambda: few(True), all_sorted, lambda: wide(False), lambda: wide(True)]
    if mode is None:
        sampled = jax.lax.switch(sampling_mode(temperature, top_k, top_p), [lambda _, f=f: f() for f in branches], None)
    else:
        sampled = branches[mode]()
    return jnp.where(hot, sampled, greedy)


# -----------------------------------------------------------------------------
# The KV-cache engine

@dataclass
class Row:
    """One sequence's calculator-tool state: the expression being written and the tokens still to force."""
    forced: deque = field(default_factory=deque)
    in_python: bool = False
    expr: list = field(default_factory=list)


class Engine:
    """Prefill once, then decode all samples of a prompt as rows of one batch over a preallocated KV
    cache (L, B, S, K, Dh). Prompt lengths and attention spans are bucketed to powers of two, so few
    shapes compile; the cache is donated to each step, so it is updated in place. The weights are kept
    as a flat tuple of arrays (self.state): a jitted call flattens its arguments every time, and an
    nnx.State of ~120 leaves took milliseconds to pass where a tuple takes tens of microseconds. After the
    model's leaves come each layer's c_q, c_k and c_v as one matrix (model.fused_qkv), which decoding reads."""

    FORCED = 64  # room for one calculator result on the device loop (results are at most ~25 characters)
    # device-loop steps between reads of its condition: XLA copies a while loop's condition to the host each
    # iteration, and the GPU waits while the host reads it and launches the next; an inner loop of a known number
    # of steps runs without that (bench decode --check-every). One H100, d20: batch 1 0.83-0.84 ms a step against
    # 0.85 with 1 (0.83 with 16), batch 128 2.24 against 2.29, the server's rounds of 16 987-994 tok/s against 924-954
    CHECK_EVERY = 8
    TRANSPOSED = True  # hold the blocks' Linear kernels as W.T (model.dense says why)

    def __init__(self, model, tokenizer, max_len=None, cache_dtype=None):
        # one device, plainly placed: weights restored onto a training mesh would give every output that mesh's
        # sharding, and a cache that changes sharding between calls recompiles the step
        self.device = jax.devices()[0]
        self.load_weights(model)
        self.tokenizer, self.config = tokenizer, model.config
        self.max_len = max_len or model.config.sequence_len
        self.cache_dtype = cache_dtype or model.dtype  # bf16 on GPU, fp32 on CPU
        special = tokenizer.encode_special
        self.stop_ids = {special("<|assistant_end|>"), special("<|bos|>")}
        self.python = (special("<|python_start|>"), special("<|python_end|>"), special("<|output_start|>"), special("<|output_end|>"))
        # mode: sample_next's static path (generate and generate_batch, whose knobs are fixed per call), or None
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len", "mode"))
        self._step = jax.jit(self._step_fn, static_argnames=("window", "mode"), donate_argnums=(2, 3))
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0, 1))
        self._loop = jax.jit(self._loop_fn, static_argnames=("window", "mode"), donate_argnums=(1, 2))

    def load_weights(self, model):
        """Take model's current weights (RL refreshes them after every update): the same shapes and dtypes
        each time, so nothing recompiles, and the previous copy is dropped."""
        self.graphdef, state = nnx.split(model)
        # weights in the compute dtype: decoding is bound by reading them, so bf16 halves the bytes on GPU
        state = jax.tree.map(lambda x: x.astype(model.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        # the blocks' Linear kernels transposed, (d_out, d_in): see model.dense
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        is_block_kernel = lambda path: str(getattr(path[0], "key", "")) == "blocks" and any(getattr(k, "key", None) == "kernel" for k in path)
        leaves = [x.T if self.TRANSPOSED and is_block_kernel(path) else x for path, x in leaves]
        self.n_leaves = len(leaves)
        self.state = None  # free the old weights before placing the new ones
        # after the model's leaves, each layer's c_q, c_k and c_v as one matrix: one product per layer instead of three
        self.state = tuple(jax.device_put(leaves + model.fused_qkv(model.dtype), self.device))

    # --- the jitted pieces; knobs = (temperature, top_k, top_p), each (B,)

    def model(self, state):
        """The model over weights in the engine's flat form (traced inside the jitted functions)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, state[:self.n_leaves]))

    def decode(self, state, *args, **kwargs):
        """model.decode over the engine's weights, with its fused QKV matrices."""
        return self.model(state).decode(*args, transposed=self.TRANSPOSED, qkv=state[self.n_leaves:], **kwargs)

    def new_cache(self, batch, length=None):
        """Zero caches of `length` positions (default max_len). Outside a trace they are placed on the engine's
        device, as the jitted calls' outputs that replace them are: jit compiles an unplaced argument apart."""
        c = self.config
        shape = (c.n_layer, batch, length or self.max_len, c.n_kv_head, c.head_dim)
        k, v = jnp.zeros(shape, self.cache_dtype), jnp.zeros(shape, self.cache_dtype)
        return (k, v) if isinstance(k, jax.core.Tracer) else tuple(jax.device_put((k, v), self.device))

    def bucket(self, n):
        """Static size for n positions: a power of two, at least 16, at most the cache."""
        return min(self.max_len, max(16, 1 << (int(n) - 1).bit_length()))

    def cache_len(self, prompt_len, max_tokens):
        """Cache positions one generation needs: the bucket of prompt + max_tokens (a batch of 128 at
        max_len 2048 would otherwise allocate, and fill at prefill, 27 GB of cache for d20)."""
        return self.bucket(min(self.max_len, prompt_len + max_tokens))

    def _prefill_fn(self, state, padded, lengths, seeds, rows, *knobs, cache_len=None, mode=None):
        """Run n prompts, right-padded to (n, bucket) and `lengths` (n,) long; return the first sampled token of
        each of the R = n·N rows (len(seeds), N samples of each prompt, prompt-major) and the prompts' caches
        (cache_len positions, default max_len) repeated to R rows. What the padding writes into a row's cache
        lies beyond its prompt: decoding overwrites it before any query may attend to it."""
        model = self.model(state)
        n = padded.shape[0]
        k, v = self.new_cache(n, cache_len)
        h, k, v = self.decode(state, padded, k, v, jnp.zeros((n,), jnp.int32), window=padded.shape[1])
        N = seeds.shape[0] // n
        logits = jnp.repeat(model.logits(h[jnp.arange(n), lengths - 1]), N, axis=0)  # each row draws its own first token
        first = sample_next(logits, row_keys(seeds, rows, jnp.zeros_like(rows)), *knobs, mode=mode)
        return first, jnp.repeat(k, N, axis=1), jnp.repeat(v, N, axis=1)

    def _step_fn(self, state, tokens, k, v, pos, seeds, rows, steps, *knobs, window, mode=None):
        """Feed tokens (B,) at positions pos (B,) and sample the next token of every row: the model's work in one
        iteration of the device loop, alone (bench decode --profile traces it)."""
        model = self.model(state)
        h, k, v = self.decode(state, tokens[:, None], k, v, pos, window)
        return sample_next(model.logits(h[:, 0]), row_keys(seeds, rows, steps), *knobs, mode=mode), k, v

    def _insert_fn(self, k, v, k_rows, v_rows, slots):
        """Copy the rows of a prefilled cache (L, n, S, K, Dh) into rows `slots` (n,) of a batch cache; a slot
        past the batch (padding rows of a prefill) is not written."""
        put = lambda c, r: c.at[:, slots].set(r, mode="drop")
        return put(k, k_rows), put(v, v_rows)

    def _loop_fn(self, state, k, v, c, seeds, rows, *knobs, window, mode=None):
        """Decode on the device until every row stopped, c["limit"] steps in all (at most max_tokens, the width
        of c["out"]), a row closing a calculator call, which the host must answer, or a row reaching the attention
        window, which the host then widens. Each step takes every live row's pending candidate (or a forced
        token), records it, and feeds it to sample the next candidate. A row is done at a stop token or once the
        cache is full (the token that would go past its last position is recorded, never fed); done rows stand
        still. c["base"] (R,): tokens each row had before this carry began (the chat scheduler's rows start apart),
        which keys its draws. The caches k, v are donated.
        The steps run CHECK_EVERY at a time in an inner loop of known length, which XLA runs without reading a
        condition back; a step taken after the loop should have stopped changes nothing (see `step`)."""
        model = self.model(state)
        last = k.shape[2] - 1  # the cache's last position (the cache may be shorter than max_len)
        py_start, py_end = self.python[:2]
        stop_a, stop_b = sorted(self.stop_ids)

        def running(c):
            live = ~c["done"]
            too_far = jnp.any(live & (c["pos"] >= window)) & (window <= last)  # a wider window would serve it
            return (c["step"] < jnp.minimum(c["limit"], c["out"].shape[1])) & jnp.any(live) & ~jnp.any(c["call"]) & ~too_far

        def step(c):
            # once the loop should have stopped no row is live: nothing is recorded and nothing moves. The caches
            # still take each row's pending token at its position, which the next step that feeds it writes again
            # before anything reads it (or a done row's position, which nothing reads)
            go = running(c)
            s, live = c["step"], ~c["done"] & go
            idx = jnp.minimum(c["n_used"], self.FORCED - 1)
            is_forced = c["n_used"] < c["n_forced"]
            token = jnp.where(is_forced, jnp.take_along_axis(c["forced"], idx[:, None], axis=1)[:, 0], c["candidate"])
            ended = (token == py_end) & c["in_python"] & live
            # a done row, or one past a full cache, rewrites a position nothing will read again
            h, k, v = self.decode(state, token[:, None], c["k"], c["v"], jnp.minimum(c["pos"], last), window)
            n = c["n_out"]  # a live row's draw is keyed by its token count, base + n + 1 (= s + 1 when rows start together)
            candidate = sample_next(model.logits(h[:, 0]), row_keys(seeds, rows, c["base"] + n + 1), *knobs, mode=mode)
            out = c["out"].at[jnp.arange(n.shape[0]), n].set(jnp.where(live, token, c["out"][jnp.arange(n.shape[0]), n]))
            return dict(c, k=k, v=v, candidate=jnp.where(live, candidate, c["candidate"]), step=s + go,
                        pos=c["pos"] + live, n_out=n + live, n_used=c["n_used"] + (is_forced & live), out=out,
                        mask=c["mask"].at[jnp.arange(n.shape[0]), n].set(jnp.where(live, ~is_forced, False)),
                        done=c["done"] | (live & ((token == stop_a) | (token == stop_b) | (c["pos"] > last))),
                        call=jnp.where(go, ended, c["call"]),
                        in_python=jnp.where(live & (token == py_start), True, c["in_python"] & ~ended))

        steps = lambda c: jax.lax.fori_loop(0, self.CHECK_EVERY, lambda _, c: step(c), c)
        c = jax.lax.while_loop(running, steps, dict(c, k=k, v=v))
        return c.pop("k"), c.pop("v"), c

    # --- generation

    def _start(self, tokens, num_samples, temperature, top_k, top_p, seed, cache_len=None, static_mode=False):
        """Prefill one prompt for num_samples rows (see _start_many)."""
        return self._start_many([tokens], num_samples, temperature, top_k, top_p, seed, cache_len, static_mode)

    def _start_many(self, prompts, num_samples, temperature, top_k, top_p, seed, cache_len=None, static_mode=False, pad_len=0):
        """Prefill prompts for num_samples rows each: (first tokens, k, v, seeds, rows, knobs, mode), the caches
        of cache_len positions (default max_len), seeds, rows and knobs already on the device. Row i·N + j is
        sample j of prompt i, keyed (seed, j): the same draws as that prompt decoded alone. static_mode: compile
        the sampling path these knobs need (mode) rather than choose it on the device (mode None). pad_len: pad the
        prompts to the bucket of at least this many tokens."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        for P in lengths:
            if not 0 < P < self.max_len:
                raise ValueError(f"prompt of {P} tokens does not fit the KV cache of {self.max_len} positions (at least one must stay free)")
        padded = np.zeros((len(prompts), self.bucket(max(pad_len, lengths.max()))), np.int32)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = p
        R = len(prompts) * num_samples
        seeds, rows = np.full(R, seed, np.int32), np.tile(np.arange(num_samples, dtype=np.int32), len(prompts))
        knobs = (np.full(R, temperature, np.float32), np.full(R, top_k, np.int32), np.full(R, top_p, np.float32))
        mode = sampling_mode(*knobs) if static_mode else None
        seeds, rows, *knobs = jax.device_put((seeds, rows, *knobs), self.device)  # sent once, not with every step
        first, k, v = self._prefill(self.state, padded, lengths, seeds, rows, *knobs, cache_len=cache_len, mode=mode)
        return first, k, v, seeds, rows, tuple(knobs), mode

    def next_token(self, row, sampled):
        """(token, mask) for a row given its sampled token: a forced token first if the calculator queued
        any (mask 0). Runs nanochat's tool state machine on whatever token is chosen."""
        token, mask = (row.forced.popleft(), 0) if row.forced else (sampled, 1)
        py_start, py_end, out_start, out_end = self.python
        if token == py_start:
            row.in_python, row.expr = True, []
        elif token == py_end and row.in_python:
            row.in_python = False
            row.forced.extend(self.tool_output(row.expr))
        elif row.in_python:
            row.expr.append(token)
        return token, mask

    def tool_output(self, expr_tokens):
        """Tokens to force after a calculator call: <|output_start|>result<|output_end|>, or none. The device loop
        holds at most FORCED of them for a row."""
        result = calculate(self.tokenizer.decode(expr_tokens))
        extra = [] if result is None else [self.python[2], *self.tokenizer.encode(result), self.python[3]]
        if len(extra) > self.FORCED:
            raise RuntimeError(f"calculator output of {len(extra)} tokens exceeds the engine's {self.FORCED}")
        return extra

    def _carry(self, first, pos, M):
        """The device loop's state for rows whose first candidates (prefilled) are `first` and whose next
        positions are pos (R,), with room for M tokens each; a call runs up to c["limit"] steps in all (M here)."""
        R = len(pos)
        zeros, false = np.zeros(R, np.int32), np.zeros(R, bool)
        return dict(candidate=first, pos=pos, step=np.int32(0), limit=np.int32(M), n_out=zeros, base=zeros,
                    out=np.zeros((R, M), np.int32), mask=np.zeros((R, M), bool), done=false, call=false, in_python=false,
                    forced=np.zeros((R, self.FORCED), np.int32), n_forced=zeros, n_used=zeros)

    def _answer_calls(self, c):
        """Answer the calculator calls that stopped the device loop, on the host: each calling row gets its
        result as forced tokens. Rows that did not call keep whatever forced tokens they have left."""
        out, n_out, call = np.asarray(c["out"]), np.asarray(c["n_out"]), np.asarray(c["call"])
        forced, n_forced, n_used = (np.array(c[name]) for name in ("forced", "n_forced", "n_used"))
        for i in np.flatnonzero(call):
            before_end = list(out[i, :n_out[i] - 1])  # the call's <|python_end|> is the row's last token
            start = len(before_end) - 1 - before_end[::-1].index(self.python[0])  # its <|python_start|>
            extra = self.tool_output(before_end[start + 1:])
            forced[i, :len(extra)], n_forced[i], n_used[i] = extra, len(extra), 0
        return dict(c, forced=forced, n_forced=n_forced, n_used=n_used, call=np.zeros_like(call))

    # device-loop steps per call when streaming: a call costs a few ms beyond its steps on a GPU (one H100, d20,
    # batch 1: 1.14 ms a token with 16, 0.90 with 64, the device loop's own 0.89), and 64 steps are ~60 ms there
    STREAM_CHUNK = 64

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=0, top_p=1.0, seed=42):
        """Stream (token column, mask column) per step, one entry per sample. mask 0 marks tokens the
        calculator tool forced into the stream. A sample ends at <|assistant_end|> or <|bos|> (still
        yielded), after max_tokens, or when the cache is full; after that its entries repeat its last token.
        The tokens come from generate_batch's device loop, STREAM_CHUNK steps a call, so the same tokens as
        generate_batch, streamed, without a host round trip per token; the first column is the prefill's own
        sample, yielded before the loop starts. (Queuing the next chunk before reading the last gains nothing on a
        GPU: XLA's while loop holds the dispatching thread until it ends, reading its condition every CHECK_EVERY steps.)"""
        P = len(tokens)  # now: the caller may extend its list as tokens arrive
        M, N = max_tokens or self.max_len, num_samples
        first, k, v, seeds, rows, knobs, mode = self._start(tokens, N, temperature, top_k, top_p, seed,
                                                            cache_len=self.cache_len(P, M), static_mode=True)
        column, masks = np.asarray(first).tolist(), [1] * N
        yield column, masks
        if M == 1 or all(t in self.stop_ids for t in column):
            return
        c, emitted = self._carry(first, np.full(N, P, np.int32), M), 1
        while True:
            upto = min(emitted + self.STREAM_CHUNK, M)  # over a window that covers every position these steps reach
            k, v, c = self._loop(self.state, k, v, dict(c, limit=np.int32(upto)), seeds, rows, *knobs,
                                 window=self.bucket(P + upto), mode=mode)
            host = jax.device_get({name: c[name] for name in ("out", "mask", "n_out", "done", "call", "step")})
            for j in range(emitted, int(host["step"])):
                live = host["n_out"] > j  # a finished sample repeats its last token
                column = [int(t) if ok else prev for t, ok, prev in zip(host["out"][:, j], live, column)]
                masks = [int(m) if ok else prev for m, ok, prev in zip(host["mask"][:, j], live, masks)]
                yield column, masks
            emitted = int(host["step"])
            if host["done"].all() or emitted >= M:
                return
            if host["call"].any():  # answer on the host, then resume where the loop stopped
                c = self._answer_calls(c)

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=0, top_p=1.0, seed=42):
        """The finished samples of one prompt (prompt and stop token excluded) and their masks, decoded on the
        device: the same tokens as collecting generate(), without a host round trip per token (the while loop
        still reads its condition back every CHECK_EVERY steps)."""
        results, masks = self.generate_many([tokens], num_samples, max_tokens, temperature, top_k, top_p, seed)
        return results[0], masks[0]

    def generate_many(self, prompts, num_samples=1, max_tokens=None, temperature=1.0, top_k=0, top_p=1.0, seed=42, batch_size=None,
                      prompt_len=None):
        """generate_batch for many prompts at once: results[i][j] and masks[i][j] are sample j of prompt i, the
        same tokens prompt i gets alone. Prompts are sorted by length and decoded batch_size rows (default: all
        of them) at a time, every batch padded to the same number of prompts, so few shapes compile. prompt_len:
        shape every batch for prompts this long (default: its own longest), so that calls with other prompts (RL's
        steps) reuse one compiled prefill and cache size."""
        N, M = num_samples, max_tokens or self.max_len
        per_batch = max(1, min(len(prompts), (batch_size or len(prompts) * N) // N))  # prompts per batch
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results, masks = [None] * len(prompts), [None] * len(prompts)
        for b in range(0, len(prompts), per_batch):
            chunk = order[b:b + per_batch]
            batch = [prompts[i] for i in chunk]
            batch += [batch[0]] * (per_batch - len(batch))  # filler rows (dropped) keep the shapes fixed
            out, mask = self._decode_rows(batch, N, M, temperature, top_k, top_p, seed, prompt_len)
            for j, i in enumerate(chunk):
                results[i], masks[i] = out[j * N:(j + 1) * N], mask[j * N:(j + 1) * N]
        return results, masks

    def _decode_rows(self, prompts, N, M, temperature, top_k, top_p, seed, prompt_len=None):
        """Decode N samples of each prompt as one batch on the device loop; (tokens, masks) per row."""
        P = max(prompt_len or 0, max(len(p) for p in prompts))
        cache_len = self.cache_len(P, M)  # long enough for every row's max_tokens
        first, k, v, seeds, rows, knobs, mode = self._start_many(prompts, N, temperature, top_k, top_p, seed,
                                                                 cache_len=cache_len, static_mode=True, pad_len=P)
        c = self._carry(first, np.repeat([len(p) for p in prompts], N).astype(np.int32), M)
        window = self.bucket(int(c["pos"].max()) + 1)  # widened as rows reach it: attention reads what is filled
        while True:
            k, v, c = self._loop(self.state, k, v, c, seeds, rows, *knobs, window=window, mode=mode)
            call, done, step = np.asarray(c["call"]), np.asarray(c["done"]), int(c["step"])
            if done.all() or step == M:
                break
            if not call.any():  # a row reached the window
                window = self.bucket(int(np.asarray(c["pos"])[~done].max()) + 1)
                continue
            c = self._answer_calls(c)
        out, mask, n_out = np.asarray(c["out"]), np.asarray(c["mask"]), np.asarray(c["n_out"])
        results, masks = [], []
        for i in range(len(out)):
            tokens_i = out[i, :n_out[i]].tolist()
            end = next((j for j, t in enumerate(tokens_i) if t in self.stop_ids), len(tokens_i))
            results.append(tokens_i[:end])
            masks.append(mask[i, :end].astype(int).tolist())
        return results, masks
