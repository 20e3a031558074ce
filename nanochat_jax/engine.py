"""
Generation. For now the reference path only: greedy decoding by recomputing the full forward pass at
every step (no KV cache). The jitted KV-cache engine arrives with the inference issue and must match it.
"""
import jax
import jax.numpy as jnp
import numpy as np

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
