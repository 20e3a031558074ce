"""
Generation.
- greedy_naive: the reference, recomputing the full forward pass at every step (no cache)
- Engine: prefill once, then decode over a preallocated KV cache with per-row positions, sampling
  (temperature, top-k, top-p, seeded), and nanochat's calculator tool forced into the stream.
  generate() streams from a host loop; generate_batch() runs the loop on the device (lax.while_loop)
  and returns to the host only when a row calls the calculator. Both give the same tokens.
The chat server's continuous batching (nanochat_jax.scheduler) drives the same prefill/insert/step.
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
    """Greedy continuations of several prompts (lists of ids) at once. forward(ids (B, L)) -> logits
    (B, L, V). All prompts sit left-aligned in one fixed (B, L) buffer, so there is one compile; causal
    attention keeps what lies after each row's cursor from mattering. A row stops at a stop id (not
    included) or after max_tokens."""
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    buf = np.zeros((B, lengths.max() + max_tokens), np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    out, done = [[] for _ in range(B)], np.zeros(B, bool)
    next_token = jax.jit(lambda ids, cur: jnp.argmax(forward(ids)[jnp.arange(B), cur - 1], axis=-1))
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

TOP_K_FAST = 256  # a top-k up to this takes lax.top_k; only a larger k, or top-p without top-k, sorts all V logits


def row_keys(seeds, rows, steps):
    """One PRNG key per row: (seed, sample index, token index). A row's draws never depend on which other
    rows share its batch, so a seeded request gives the same text alone, batched, or on the device loop."""
    key = lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t)
    return jax.vmap(key)(seeds, rows, steps)


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


def sample_next(logits, keys, temperature, top_k, top_p):
    """One token per row from fp32 logits (B, V); keys (B,) and per-row knobs (B,): temperature 0 is
    greedy, top_k 0 and top_p 1 are off. The knobs are traced, so changing them never recompiles."""
    B, V = logits.shape
    greedy = jnp.argmax(logits, axis=-1)

    def sample(_):
        def all_sorted(_):
            order = jnp.argsort(-logits, axis=-1)
            return _sample_sorted(jnp.take_along_axis(logits, order, axis=-1), order, keys, temperature, top_k, top_p)

        def few_sorted(_):
            values, ids = jax.lax.top_k(logits, min(TOP_K_FAST, V))
            plain = jax.vmap(jax.random.categorical)(keys, logits / jnp.maximum(temperature, 1e-6)[:, None])
            return jnp.where(top_k > 0, _sample_sorted(values, ids, keys, temperature, top_k, top_p), plain)

        needs_all = jnp.any(((top_k == 0) & (top_p < 1.0)) | (top_k > TOP_K_FAST))
        sampled = jax.lax.cond(needs_all, all_sorted, few_sorted, None)
        return jnp.where(temperature > 0, sampled, greedy)

    # an all-greedy batch skips sorting altogether
    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None).astype(jnp.int32)


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
    shapes compile; the cache is donated to each step, so it is updated in place."""

    FORCED = 64  # room for one calculator result on the device loop (results are at most ~25 characters)

    def __init__(self, model, tokenizer, max_len=None, cache_dtype=None):
        self.graphdef, state = nnx.split(model)
        # weights in the compute dtype: decoding is bound by reading them, so bf16 halves the bytes on GPU
        state = jax.tree.map(lambda x: x.astype(model.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        # one device, plainly placed: weights restored onto a training mesh would give every output that mesh's
        # sharding, and a cache that changes sharding between calls recompiles the step
        self.state = jax.device_put(state, jax.devices()[0])
        self.tokenizer, self.config = tokenizer, model.config
        self.max_len = max_len or model.config.sequence_len
        self.cache_dtype = cache_dtype or model.dtype  # bf16 on GPU, fp32 on CPU
        special = tokenizer.encode_special
        self.stop_ids = {special("<|assistant_end|>"), special("<|bos|>")}
        self.python = (special("<|python_start|>"), special("<|python_end|>"), special("<|output_start|>"), special("<|output_end|>"))
        self._prefill = jax.jit(self._prefill_fn)
        self._step = jax.jit(self._step_fn, static_argnames="window", donate_argnums=(2, 3))
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0, 1))
        self._loop = jax.jit(self._loop_fn, static_argnames="window", donate_argnums=(1,))

    # --- the jitted pieces; knobs = (temperature, top_k, top_p), each (B,)

    def new_cache(self, batch):
        c = self.config
        shape = (c.n_layer, batch, self.max_len, c.n_kv_head, c.head_dim)
        return jnp.zeros(shape, self.cache_dtype), jnp.zeros(shape, self.cache_dtype)

    def bucket(self, n):
        """Static size for n positions: a power of two, at least 16, at most the cache."""
        return min(self.max_len, max(16, 1 << (int(n) - 1).bit_length()))

    def _prefill_fn(self, state, padded, length, seeds, rows, *knobs):
        """Run one prompt padded to (1, bucket); return the first sampled token of each of the N rows
        (N = len(seeds)) and the prompt's cache repeated to N rows."""
        model = nnx.merge(self.graphdef, state)
        k, v = self.new_cache(1)
        h, k, v = model.decode(padded, k, v, jnp.zeros((1,), jnp.int32), window=padded.shape[1])
        N = seeds.shape[0]
        logits = jnp.repeat(model.logits(h[:, length - 1]), N, axis=0)  # each row draws its own first token
        first = sample_next(logits, row_keys(seeds, rows, jnp.zeros_like(rows)), *knobs)
        return first, jnp.repeat(k, N, axis=1), jnp.repeat(v, N, axis=1)

    def _step_fn(self, state, tokens, k, v, pos, seeds, rows, steps, *knobs, window):
        """Feed tokens (B,) at positions pos (B,) and sample the next token of every row."""
        model = nnx.merge(self.graphdef, state)
        h, k, v = model.decode(tokens[:, None], k, v, pos, window)
        return sample_next(model.logits(h[:, 0]), row_keys(seeds, rows, steps), *knobs), k, v

    def _insert_fn(self, k, v, k_row, v_row, slot):
        """Copy a one-row cache into row `slot` of a batch cache."""
        put = lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=1)
        return put(k, k_row), put(v, v_row)

    def _loop_fn(self, state, c, seeds, rows, *knobs, window):
        """Decode on the device until every row stopped, max_tokens (the width of c["out"]), a full cache,
        or a row closing a calculator call, which the host must answer. Each iteration takes the pending
        candidate (or a forced token), records it, and feeds it to sample the next candidate."""
        model = nnx.merge(self.graphdef, state)
        py_start, py_end = self.python[:2]
        stop_a, stop_b = sorted(self.stop_ids)

        def cond(c):
            return (c["step"] < c["out"].shape[1]) & ~jnp.all(c["done"]) & ~jnp.any(c["call"]) & (c["pos"][0] <= self.max_len)

        def body(c):
            s, idx = c["step"], jnp.minimum(c["n_used"], self.FORCED - 1)
            is_forced = c["n_used"] < c["n_forced"]
            token = jnp.where(is_forced, jnp.take_along_axis(c["forced"], idx[:, None], axis=1)[:, 0], c["candidate"])
            ended = (token == py_end) & c["in_python"]
            # at a full cache (pos == max_len) this writes the last position again; the loop then ends and the cache is dropped
            h, k, v = model.decode(token[:, None], c["k"], c["v"], jnp.minimum(c["pos"], self.max_len - 1), window)
            candidate = sample_next(model.logits(h[:, 0]), row_keys(seeds, rows, jnp.full_like(rows, s + 1)), *knobs)
            return dict(c, k=k, v=v, candidate=candidate, pos=c["pos"] + 1, step=s + 1, n_used=c["n_used"] + is_forced,
                        out=c["out"].at[:, s].set(token), mask=c["mask"].at[:, s].set(~is_forced),
                        done=c["done"] | (token == stop_a) | (token == stop_b), call=ended,
                        in_python=jnp.where(token == py_start, True, c["in_python"] & ~ended))

        return jax.lax.while_loop(cond, body, c)

    # --- generation

    def _start(self, tokens, num_samples, temperature, top_k, top_p, seed):
        """Prefill a prompt for num_samples rows: (first tokens, k, v, seeds, rows, knobs)."""
        P = len(tokens)
        if not 0 < P < self.max_len:
            raise ValueError(f"prompt of {P} tokens does not fit the KV cache of {self.max_len} positions (at least one must stay free)")
        padded = np.zeros((1, self.bucket(P)), np.int32)
        padded[0, :P] = tokens
        N = num_samples
        seeds, rows = np.full(N, seed, np.int32), np.arange(N, dtype=np.int32)
        knobs = (np.full(N, temperature, np.float32), np.full(N, top_k, np.int32), np.full(N, top_p, np.float32))
        first, k, v = self._prefill(self.state, padded, P, seeds, rows, *knobs)
        return first, k, v, seeds, rows, knobs

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
        """Tokens to force after a calculator call: <|output_start|>result<|output_end|>, or none."""
        result = calculate(self.tokenizer.decode(expr_tokens))
        return [] if result is None else [self.python[2], *self.tokenizer.encode(result), self.python[3]]

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=0, top_p=1.0, seed=42):
        """Stream (token column, mask column) per step, one entry per sample. mask 0 marks tokens the
        calculator tool forced into the stream. A sample ends at <|assistant_end|> or <|bos|> (still
        yielded), after max_tokens, or when the cache is full."""
        column, k, v, seeds, rows, knobs = self._start(tokens, num_samples, temperature, top_k, top_p, seed)
        P = len(tokens)  # now: the caller may extend its list as tokens arrive
        state, done = [Row() for _ in range(num_samples)], [False] * num_samples
        max_tokens = max_tokens or self.max_len
        for step in range(max_tokens):
            sampled = np.asarray(column)  # syncs: the host decides what each row sees next
            column, masks = map(list, zip(*(self.next_token(row, int(t)) for row, t in zip(state, sampled))))
            done = [d or t in self.stop_ids for d, t in zip(done, column)]
            yield column, masks
            pos = P + step  # where this column goes in the cache
            if all(done) or step == max_tokens - 1 or pos >= self.max_len:
                break  # pos == max_len: the cache is full, stop rather than overwrite it
            # fresh arrays every call: jax may read a numpy buffer after dispatch returns, so never mutate one in place
            column, k, v = self._step(self.state, np.asarray(column, np.int32), k, v, np.full(num_samples, pos, np.int32), seeds, rows,
                                      np.full(num_samples, step + 1, np.int32), *knobs, window=self.bucket(pos + 1))

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=0, top_p=1.0, seed=42):
        """The finished samples (prompt and stop token excluded) and their masks, decoded on the device:
        the same tokens as collecting generate(), without a host round trip per token."""
        first, k, v, seeds, rows, knobs = self._start(tokens, num_samples, temperature, top_k, top_p, seed)
        N, P = num_samples, len(tokens)
        M = max_tokens or self.max_len
        zeros, false = np.zeros(N, np.int32), np.zeros(N, bool)
        c = dict(k=k, v=v, candidate=first, pos=np.full(N, P, np.int32), step=np.int32(0),
                 out=np.zeros((N, M), np.int32), mask=np.zeros((N, M), bool), done=false, call=false, in_python=false,
                 forced=np.zeros((N, self.FORCED), np.int32), n_forced=zeros, n_used=zeros)
        window = self.bucket(min(self.max_len, P + M))
        while True:
            c = self._loop(self.state, c, seeds, rows, *knobs, window=window)
            call, step = np.asarray(c["call"]), int(c["step"])
            if not call.any() or step == M or int(c["pos"][0]) > self.max_len:
                break
            # answer the calculator calls on the host, then resume the device loop where it stopped;
            # rows that did not call keep whatever forced tokens they have left
            out = np.asarray(c["out"])
            forced, n_forced, n_used = (np.array(c[name]) for name in ("forced", "n_forced", "n_used"))
            for i in np.flatnonzero(call):
                before_end = list(out[i, :step - 1])  # the call's <|python_end|> sits at step - 1
                start = len(before_end) - 1 - before_end[::-1].index(self.python[0])  # its <|python_start|>
                extra = self.tool_output(before_end[start + 1:])
                if len(extra) > self.FORCED:
                    raise RuntimeError(f"calculator output of {len(extra)} tokens exceeds the engine's {self.FORCED}")
                forced[i, :len(extra)], n_forced[i], n_used[i] = extra, len(extra), 0
            c = dict(c, forced=forced, n_forced=n_forced, n_used=n_used, call=false)
        out, mask, step = np.asarray(c["out"]), np.asarray(c["mask"]), int(c["step"])
        results, masks = [], []
        for i in range(N):
            tokens_i = list(out[i, :step])
            end = next((j for j, t in enumerate(tokens_i) if t in self.stop_ids), step)
            results.append([int(t) for t in tokens_i[:end]])
            masks.append([int(m) for m in mask[i, :end]])
        return results, masks
