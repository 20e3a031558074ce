"""
Continuous batching for the chat server. One thread owns the engine and a KV cache of `slots` rows;
requests from any number of threads queue up, are prefilled into free rows between decode steps (those
that wait together as the rows of one prefill), and leave their row as soon as they finish or their
client goes away. Every step decodes all active rows together, so concurrent chats share the weight
reads instead of each holding a model; it runs only the first rows that cover the busy ones (a power of
four), so a lone chat does not pay for 32 rows of cache. Steps are pipelined: the next one is queued with
the tokens the last one sampled, still on the device, before the host reads them, so the device keeps
decoding while the host streams; the host redoes a step only when it changes a row's token (a calculator
result) or admits new rows.

    scheduler = Scheduler(engine, slots=32)
    request = scheduler.submit(prompt_ids, max_tokens=256, temperature=0.8, top_k=50)
    for token in request:  # generated ids as they come; request.finish_reason is then "stop" or "length"
        ...
"""
import queue
import secrets
import threading
import time
from collections import Counter

import jax
import numpy as np

from nanochat_jax.engine import Row, sampling_mode


class Request:
    """One completion: iterate it for the generated token ids (stop token excluded)."""

    def __init__(self, tokens, max_tokens, temperature, top_k, top_p, seed):
        self.tokens, self.max_tokens = list(tokens), max_tokens
        self.knobs = (temperature, top_k, top_p)
        self.seed = secrets.randbits(31) if seed is None else seed
        self.events = queue.Queue()  # token ids, then None at the end
        self.finish_reason = None  # "stop" (a stop token) or "length" (max_tokens or a full cache)
        self.error = None
        self.cancelled = threading.Event()
        self.submitted, self.first_token_at = time.perf_counter(), None
        self.generated = 0

    def cancel(self):
        """The client went away: the scheduler frees the row before its next step."""
        self.cancelled.set()

    def __iter__(self):
        while (token := self.events.get()) is not None:
            yield token
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error}")


class Scheduler:
    """A step whose sampling rows all take the top-k fast path (sampling_mode 2, the chat defaults; greedy rows
    may be beside them) compiles that path alone; any other mix picks its path on the device, by a switch whose
    index XLA reads back before the step returns, so such a step is not queued ahead of the device.
    warmup=True compiles every prefill and decode shape before the first request is served (the server
    reports ready=False meanwhile), so no client ever waits for a compile. prefill_rows (a power of two): the
    most waiting requests prefilled together in one call, so a burst of clients waits for a few batched
    prefills instead of one prefill after another."""

    STATIC_MODE = 2  # sample_next's path compiled on its own: the top candidates (top-k <= TOP_K_FAST, any temperature)

    def __init__(self, engine, slots=32, warmup=False, prefill_rows=8):
        if prefill_rows < 1 or prefill_rows & (prefill_rows - 1):
            raise ValueError(f"prefill_rows must be a power of two, got {prefill_rows}")
        self.engine, self.slots, self.prefill_rows = engine, slots, min(prefill_rows, 1 << (slots - 1).bit_length())
        self.k, self.v = engine.new_cache(slots)
        self.active = [None] * slots  # per row: (request, tool state) or None
        self.pos = np.zeros(slots, np.int32)  # where each row's next token goes in the cache
        self.candidates = np.zeros(slots, np.int32)  # each row's sampled, not yet emitted token
        self.pending = None  # the step in flight: (its sampled tokens on the device, the rows it decoded)
        self.waiting = queue.Queue()
        self.stats = dict(requests=0, completed=0, cancelled=0, failed=0, tokens=0, steps=0, batch_sizes=Counter(),
                          prefill_sizes=Counter())
        self.stats_lock = threading.Lock()  # /stats reads from other threads
        self._stop, self.ready = threading.Event(), threading.Event()
        self.warmup = warmup
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, tokens, max_tokens=256, temperature=1.0, top_k=0, top_p=1.0, seed=None):
        if not 0 < len(tokens) < self.engine.max_len:
            raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context of {self.engine.max_len}")
        request = Request(tokens, max_tokens, temperature, top_k, top_p, seed)
        self.waiting.put(request)
        return request

    def snapshot(self):
        """Counters for /stats: rows in use, queue length, how many rows each decode step ran and how many
        requests each prefill took."""
        busy = sum(r is not None for r in self.active)
        with self.stats_lock:
            stats = dict(self.stats, **{name: {str(k): v for k, v in sorted(self.stats[name].items())}
                                        for name in ("batch_sizes", "prefill_sizes")})
        return dict(stats, slots=self.slots, busy_slots=busy, free_slots=self.slots - busy, waiting=self.waiting.qsize())

    def close(self):
        self._stop.set()
        self.thread.join()

    # -----------------------------------------------------------------------------
    # the scheduler thread

    def _compile_all(self):
        """Run each static shape once: prefills of every group size with prompts padded to every bucket, decode
        steps over every window. The prefills' rows are inserted past the batch, so nothing is written, and
        what the decode steps write into free rows is never read."""
        sizes, n = [], 16
        while (b := self.engine.bucket(n)) not in sizes:
            sizes.append(b)
            n *= 2
        zeros = np.zeros(self.slots, np.int32)
        knobs = (np.ones(self.slots, np.float32), np.full(self.slots, 50, np.int32), np.ones(self.slots, np.float32))
        assert sampling_mode(*knobs) == self.STATIC_MODE
        for size in sizes:
            for rows in self._group_sizes():
                dummy = Request([0] * min(size, self.engine.max_len - 1), 1, 1.0, 50, 1.0, 0)
                self._prefill([dummy] * rows, slots=[self.slots] * rows)
            for n in self._step_rows():
                for mode in (None, self.STATIC_MODE):
                    tokens = jax.device_put(zeros[:n], self.engine.device)  # as _dispatch passes them
                    _, self.k, self.v = self.engine._step(self.engine.state, tokens, self.k, self.v, zeros[:n], zeros[:n], zeros[:n],
                                                          zeros[:n], *(x[:n] for x in knobs), window=size, mode=mode)

    def _step_rows(self):
        """The row counts a decode step runs: powers of four below slots, and slots."""
        counts = [1]
        while counts[-1] * 4 < self.slots:
            counts.append(counts[-1] * 4)
        return counts + [self.slots] if self.slots > 1 else counts

    def _group_sizes(self):
        """The row counts a prefill is padded to: powers of two up to prefill_rows."""
        return [1 << i for i in range(self.prefill_rows.bit_length())]

    def _run(self):
        if self.warmup:
            t0 = time.perf_counter()
            self._compile_all()
            print(f"scheduler: compiled all shapes in {time.perf_counter() - t0:.1f} s")
        self.ready.set()
        while not self._stop.is_set():
            try:
                admitted = self._admit()
                if not any(self.active):
                    self.pending = None  # rows that all finished leave nothing to read
                    continue
                self._advance(admitted)
            except Exception as e:  # never let one bad step kill the server: fail the rows in flight
                for i, entry in enumerate(self.active):
                    if entry is not None:
                        entry[0].error = f"{type(e).__name__}: {e}"
                        self._finish(i, None, "failed")
                self.pending = None
                self.k, self.v = self.engine.new_cache(self.slots)  # a failed step may have consumed the donated cache

    def _admit(self):
        """Prefill waiting requests into free rows, up to prefill_rows of them per call; block briefly when
        there is nothing to do. Returns the rows it filled."""
        admitted = set()
        while None in self.active:
            group, free = [], self.active.count(None)
            while len(group) < min(free, self.prefill_rows):
                try:
                    request = self.waiting.get(timeout=0.05 if not any(self.active) and not group else 0)
                except queue.Empty:
                    break
                if request.cancelled.is_set():
                    self._close(request, None)
                else:
                    group.append(request)
            if not group:
                return admitted
            slots = [i for i, entry in enumerate(self.active) if entry is None][:len(group)]
            admitted.update(slots)
            for request, slot in zip(group, slots):
                self.active[slot] = (request, Row())  # first: should the prefill fail, _run fails these rows too
            self._prefill(group, slots)
            self.stats["requests"] += len(group)
            with self.stats_lock:
                self.stats["prefill_sizes"][len(group)] += 1
        return admitted

    def _prefill(self, group, slots):
        """Prefill the group's prompts as the rows of one call, padded to the next group size (padding rows
        repeat the first prompt and are not inserted), and put each row's cache into its slot."""
        rows = next(n for n in self._group_sizes() if n >= len(group))
        padded = group + [group[0]] * (rows - len(group))
        lengths = np.array([len(r.tokens) for r in padded], np.int32)
        tokens = np.zeros((rows, self.engine.bucket(lengths.max())), np.int32)
        for i, r in enumerate(padded):
            tokens[i, :len(r.tokens)] = r.tokens
        knobs = np.array([r.knobs for r in padded], np.float64)
        first, k_rows, v_rows = self.engine._prefill(
            self.engine.state, tokens, lengths, np.array([r.seed for r in padded], np.int32), np.zeros(rows, np.int32),
            knobs[:, 0].astype(np.float32), knobs[:, 1].astype(np.int32), knobs[:, 2].astype(np.float32))
        targets = np.array(list(slots) + [self.slots] * (rows - len(group)), np.int32)  # past the batch: dropped
        self.k, self.v = self.engine._insert(self.k, self.v, k_rows, v_rows, targets)
        first = np.asarray(first)
        for i, (request, slot) in enumerate(zip(group, slots)):
            if slot < self.slots:
                self.pos[slot], self.candidates[slot] = len(request.tokens), int(first[i])

    def _emit(self):
        """Hand each row its next token (the calculator may force one) and retire finished rows."""
        for i, entry in enumerate(self.active):
            if entry is None:
                continue
            request, row = entry
            if request.cancelled.is_set():
                self._finish(i, None, "cancelled")
                continue
            token, _ = self.engine.next_token(row, int(self.candidates[i]))
            self.candidates[i] = token  # what gets fed back
            request.generated += 1
            self.stats["tokens"] += 1
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
            if token in self.engine.stop_ids:
                self._finish(i, "stop", "completed")
                continue
            request.events.put(token)
            if request.generated >= request.max_tokens or self.pos[i] >= self.engine.max_len:
                self._finish(i, "length", "completed")  # max_tokens, or the cache is full

    def _advance(self, admitted):
        """Emit every busy row's token and leave the step that feeds them in flight. With a step already in flight
        and nothing to change, the next one is queued first with its sampled tokens as they lie on the device, then
        those are read; it stands if every row emits what it sampled, else a step with the emitted tokens (a
        calculator result, rows just admitted) replaces it, rewriting the same cache positions."""
        ahead = None
        if self.pending is not None and not admitted and not any(entry[1].forced for entry in self.active if entry):
            ahead = self._dispatch(self.pending[0], ahead=True)
        if self.pending is not None:
            sampled, fed = np.asarray(self.pending[0]), self.pending[1]
            for i in np.flatnonzero(fed):
                if i not in admitted:  # a row admitted since holds its prefill's sample
                    self.candidates[i] = sampled[i]
        sampled = self.candidates.copy()
        self._emit()
        busy = np.array([entry is not None for entry in self.active])
        if not busy.any():
            self.pending = None
        elif ahead is not None and (self.candidates[busy] == sampled[busy]).all():
            self.pending = ahead
        else:
            self.pending = self._dispatch(jax.device_put(self.candidates[:self._rows(busy)], self.engine.device))
        if self.pending is not None:
            self.pos = self.pos + self.pending[1]
            with self.stats_lock:
                self.stats["steps"] += 1
                self.stats["batch_sizes"][int(self.pending[1].sum())] += 1

    def _rows(self, busy):
        """The rows a step decodes: the fewest of _step_rows that cover every busy row."""
        return next(n for n in self._step_rows() if n > np.flatnonzero(busy).max())

    def _dispatch(self, tokens, ahead=False):
        """Queue one step that feeds tokens (n,) to the first n rows (the busy ones among them at their positions;
        free rows decode a dummy that is never read). ahead: queued before this round's tokens are emitted, so
        each row's token count is one more than it is now. Returns (sampled tokens on the device, rows fed)."""
        busy = np.array([entry is not None for entry in self.active])
        n = self._rows(busy)
        if tokens.shape[0] != n:
            return None
        knobs = np.array([entry[0].knobs if entry else (0.0, 0, 1.0) for entry in self.active[:n]], np.float64)
        seeds = np.array([entry[0].seed if entry else 0 for entry in self.active[:n]], np.int32)
        steps = np.array([entry[0].generated + ahead if entry else 0 for entry in self.active[:n]], np.int32)
        pos = np.where(busy[:n], self.pos[:n], 0).astype(np.int32)  # fresh arrays: jax may read them after dispatch
        knobs = knobs[:, 0].astype(np.float32), knobs[:, 1].astype(np.int32), knobs[:, 2].astype(np.float32)
        mode = sampling_mode(*knobs)
        sampled, self.k, self.v = self.engine._step(
            self.engine.state, tokens, self.k, self.v, pos, seeds, np.zeros(n, np.int32), steps, *knobs,
            window=self.engine.bucket(int(pos.max()) + 1), mode=mode if mode == self.STATIC_MODE else None)
        return sampled, busy

    def _finish(self, slot, reason, outcome):
        self._close(self.active[slot][0], reason)
        self.active[slot] = None
        self.stats[outcome] += 1

    def _close(self, request, reason):
        request.finish_reason = reason
        request.events.put(None)
