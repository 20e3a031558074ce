"""
Generation.
- greedy_naive: the reference, recomputing the full forward pass at every step (no cache)
- Engine: prefill once, then decode over a preallocated KV cache with per-row positions, sampling
  (temperature, top-k, top-p, seeded), and nanochat's calculator tool forced into the stream
"""
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
# The KV-cache engine

def sample_next(logits, key, temperature, top_k, top_p):
    """One token per row from fp32 logits (B, V). temperature 0 = greedy; top_k 0 and top_p 1 = off.
    All three are traced values, so changing them never recompiles."""
    V = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # (B, V), largest first
    kth = desc[:, jnp.clip(top_k, 1, V) - 1][:, None]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)  # keep the k largest
    scaled = logits / jnp.maximum(temperature, 1e-6)
    desc = -jnp.sort(-scaled, axis=-1)
    reach = jnp.argmax(jnp.cumsum(jax.nn.softmax(desc, axis=-1), axis=-1) >= top_p, axis=-1)  # first index with mass >= top_p
    cut = jnp.take_along_axis(desc, reach[:, None], axis=-1)
    scaled = jnp.where((top_p < 1.0) & (scaled < cut), -jnp.inf, scaled)  # nucleus: the smallest set with mass >= top_p
    sampled = jax.random.categorical(key, scaled, axis=-1)  # rows draw independently
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


class Engine:
    """Prefill once, then decode all samples of a prompt as rows of one batch over a preallocated KV
    cache (L, B, S, K, Dh). Prompt lengths are bucketed to powers of two, so a new length rarely
    compiles; the cache is donated to each step, so it is updated in place."""

    def __init__(self, model, tokenizer, max_len=None, cache_dtype=None):
        self.graphdef, state = nnx.split(model)
        # weights in the compute dtype: decoding is bound by reading them, so bf16 halves the bytes on GPU
        self.state = jax.tree.map(lambda x: x.astype(model.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        self.tokenizer, self.config = tokenizer, model.config
        self.max_len = max_len or model.config.sequence_len
        self.cache_dtype = cache_dtype or model.dtype  # bf16 on GPU, fp32 on CPU
        special = tokenizer.encode_special
        self.stop_ids = {special("<|assistant_end|>"), special("<|bos|>")}
        self.python = (special("<|python_start|>"), special("<|python_end|>"), special("<|output_start|>"), special("<|output_end|>"))
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(2,))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(2, 3))

    def _prefill_fn(self, state, padded, num_samples, length, key, temperature, top_k, top_p):
        c = self.config
        shape = (c.n_layer, 1, self.max_len, c.n_kv_head, c.head_dim)
        k, v = jnp.zeros(shape, self.cache_dtype), jnp.zeros(shape, self.cache_dtype)
        logits, k, v = nnx.merge(self.graphdef, state).decode(padded, k, v, jnp.zeros((1,), jnp.int32))
        last = jnp.repeat(logits[:, length - 1], num_samples, axis=0)  # (N, V): each sample draws its own first token
        first = sample_next(last, key, temperature, top_k, top_p)
        return first, jnp.repeat(k, num_samples, axis=1), jnp.repeat(v, num_samples, axis=1)

    def _decode_fn(self, state, tokens, k, v, pos, key, temperature, top_k, top_p):
        logits, k, v = nnx.merge(self.graphdef, state).decode(tokens[:, None], k, v, pos)
        return sample_next(logits[:, 0], key, temperature, top_k, top_p), k, v

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=0, top_p=1.0, seed=42):
        """Stream (token column, mask column) per step, one entry per sample. mask 0 marks tokens the
        calculator tool forced into the stream. A sample ends at <|assistant_end|> or <|bos|> (still
        yielded), after max_tokens, or when the cache is full."""
        P = len(tokens)
        if not 0 < P < self.max_len:
            raise ValueError(f"prompt of {P} tokens does not fit the KV cache of {self.max_len} positions (at least one must stay free)")
        bucket = min(self.max_len, max(16, 1 << (P - 1).bit_length()))  # powers of two: few prompt shapes, few compiles
        padded = np.zeros((1, bucket), np.int32)
        padded[0, :P] = tokens
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        column, k, v = self._prefill(self.state, padded, num_samples, P, sub, *knobs)
        pos = np.full((num_samples,), P, np.int32)
        forced = [[] for _ in range(num_samples)]
        in_python, expr = [False] * num_samples, [[] for _ in range(num_samples)]
        done = [False] * num_samples
        py_start, py_end, out_start, out_end = self.python
        max_tokens = max_tokens or self.max_len
        for step in range(max_tokens):
            sampled = np.asarray(column)  # syncs: the host decides what each row sees next
            column, masks = [], []
            for i in range(num_samples):
                token, mask = (forced[i].pop(0), 0) if forced[i] else (int(sampled[i]), 1)
                column.append(token)
                masks.append(mask)
                if token in self.stop_ids:
                    done[i] = True
                elif token == py_start:
                    in_python[i], expr[i] = True, []
                elif token == py_end and in_python[i]:
                    in_python[i] = False
                    result = calculate(self.tokenizer.decode(expr[i]))
                    if result is not None:
                        forced[i] += [out_start, *self.tokenizer.encode(result), out_end]
                elif in_python[i]:
                    expr[i].append(token)
            yield column, masks
            if all(done) or step == max_tokens - 1 or pos[0] >= self.max_len:
                break  # pos[0] == max_len: the cache is full, stop rather than overwrite it
            key, sub = jax.random.split(key)
            column, k, v = self._decode(self.state, jnp.asarray(column, jnp.int32), k, v, jnp.asarray(pos), sub, *knobs)
            pos += 1

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """The finished samples (prompt excluded, stop token excluded) and their masks."""
        results, masks = [[] for _ in range(num_samples)], [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in self.stop_ids:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks
