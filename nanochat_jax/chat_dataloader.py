"""
Batches of conversations for midtraining and SFT, each rendered with tokenizer.render_conversation.

mid  (nanochat v1 mid_train) conversations rendered in mixture order, concatenated into one flat token
     stream and cut into B·T+1 windows, training on every token (the render mask is ignored): exactly the
     pretraining stream packer (dataloader.PackedBatches) over a grain MapDataset of conversation chunks,
     so the loader state checkpoints and resumes bit for bit as in base training. One epoch.
sft  (nanochat v1 chat_sft) step s takes examples s·E .. (s+1)·E-1 of the mixture (E examples per step),
     grad_accum micro-batches of B conversations each; targets are -1 where the render mask is 0 and on
     padding. nanochat pads each batch to its longest conversation and runs uncompiled; here every
     micro-batch of a step is padded to the smallest of a few fixed lengths (powers of two up to T) that
     holds the step's longest conversation, so only that handful of shapes ever compiles.
"""
import grain
import numpy as np

from nanochat_jax.dataloader import PackedBatches


class RenderedConversations(grain.MapDataset):
    """Element i: chunk `units[i]` of `chunk` conversations of the task, rendered: {'index': i, 'docs': [ids]}.
    Process r of W takes chunks r, r+W, ..., like the pretraining loader's row groups; epochs=1 ends after one pass."""

    def __init__(self, task, tokenizer, chunk=256, max_tokens=2048, process_index=0, process_count=1, epochs=1):
        super().__init__()
        self.task, self.tokenizer, self.chunk, self.max_tokens, self.epochs = task, tokenizer, chunk, max_tokens, epochs
        n_chunks = -(-len(task) // chunk)
        self.units = list(range(process_index, n_chunks, process_count))
        if not self.units:
            raise ValueError(f"process {process_index} of {process_count} gets no conversations: the mixture has only "
                             f"{len(task)} rows ({n_chunks} chunks of {chunk})")

    def __len__(self):
        return len(self.units) * self.epochs

    def __getitem__(self, index):
        c = self.units[index % len(self.units)]
        rows = range(c * self.chunk, min((c + 1) * self.chunk, len(self.task)))
        docs = [np.asarray(self.tokenizer.render_conversation(self.task[i], self.max_tokens)[0], np.int32) for i in rows]
        return {"index": index, "docs": docs}


def make_mid_loader(task, tokenizer, batch_size, seq_len, process_index=0, process_count=1, threads=4, prefetch=256):
    """One epoch of the mixture as the stream of B·T+1-token windows {'inputs', 'targets'} (B, T). The read-ahead
    is deep (256 chunks, ~65K conversations): one d20 step takes thousands of short conversations, and the
    threads render them while the device computes, so the loop never waits for them."""
    conversations = RenderedConversations(task, tokenizer, process_index=process_index, process_count=process_count)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))
    return PackedBatches(conversations, read_options, batch_size, seq_len, mode="stream")


def mid_stream_tokens(task, tokenizer, process_index=0, process_count=1, threads=2):
    """Tokens of this process's share of the mixture: how many windows one epoch has."""
    conversations = RenderedConversations(task, tokenizer, process_index=process_index, process_count=process_count)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(8, threads))
    return sum(sum(len(d) for d in element["docs"]) for element in conversations.to_iter_dataset(read_options))


# -----------------------------------------------------------------------------
# SFT

def sft_buckets(seq_len, smallest=64):
    """The padded lengths a micro-batch can have: powers of two from `smallest`, then seq_len itself."""
    buckets, n = [], smallest
    while n < seq_len:
        buckets.append(n)
        n *= 2
    return buckets + [seq_len]


class SFTBatches(grain.DatasetIterator):
    """Steps {'inputs', 'targets'} (grad_accum, rows, L) int32 of this process's rows, plus 'tokens' (non-padding
    inputs) and 'trained' (targets not -1), counted over the whole step. The state is the next step."""

    def __init__(self, task, tokenizer, examples_per_step, grad_accum, global_rows, seq_len, process_index=0, process_count=1,
                 buckets=None):
        super().__init__()
        if examples_per_step != grad_accum * global_rows:
            raise ValueError(f"examples per step {examples_per_step} != grad accum {grad_accum} x rows per micro-step {global_rows}")
        if global_rows % process_count:
            raise ValueError(f"{global_rows} rows per micro-step do not split over {process_count} processes")
        self.task, self.tokenizer, self.E, self.A, self.R, self.T = task, tokenizer, examples_per_step, grad_accum, global_rows, seq_len
        self.rows = slice(process_index * global_rows // process_count, (process_index + 1) * global_rows // process_count)
        self.buckets = buckets or sft_buckets(seq_len)
        self.pad = tokenizer.encode_special("<|assistant_end|>")  # as nanochat; never a target
        self.num_steps = len(task) // examples_per_step  # one epoch, the last partial step dropped
        self.step = 0

    def __next__(self):
        if self.step >= self.num_steps:
            raise StopIteration
        first = self.step * self.E
        # every process renders the whole step (E conversations): the padded length must agree on all of them
        rendered = [self.tokenizer.render_conversation(self.task[i], max_tokens=self.T + 1) for i in range(first, first + self.E)]
        longest = max(len(ids) - 1 for ids, _ in rendered)
        L = next(b for b in self.buckets if b >= longest)
        inputs = np.full((self.E, L), self.pad, np.int32)
        targets = np.full((self.E, L), -1, np.int32)
        for r, (ids, mask) in enumerate(rendered):
            ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
            n = len(ids) - 1
            inputs[r, :n] = ids[:-1]
            targets[r, :n] = np.where(mask[1:], ids[1:], -1)  # a target counts where the token it predicts is trained
        self.step += 1
        shape = (self.A, self.R, L)  # micro-batch a holds examples first + a·R .. first + (a+1)·R - 1
        return {"inputs": inputs.reshape(shape)[:, self.rows], "targets": targets.reshape(shape)[:, self.rows],
                "tokens": sum(len(ids) - 1 for ids, _ in rendered), "trained": int((targets >= 0).sum()), "padded": self.E * L}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]
