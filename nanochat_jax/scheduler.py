"""
Continuous batching for the chat server. One thread owns the engine and a KV cache of `slots` rows;
requests from any number of threads queue up, are prefilled into free rows between decode steps, and
leave their row as soon as they finish or their client goes away. Every step decodes all active rows
together, so concurrent chats share the weight reads instead of each holding a model.

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

import numpy as np

from nanochat_jax.engine import Row


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
    """warmup=True compiles every prefill and decode shape before the first request is served (the
    server reports ready=False meanwhile), so no client ever waits for a compile."""

    def __init__(self, engine, slots=32, warmup=False):
        self.engine, self.slots = engine, slots
        self.k, self.v = engine.new_cache(slots)
        self.active = [None] * slots  # per row: (request, tool state) or None
        self.pos = np.zeros(slots, np.int32)  # where each row's next token goes in the cache
        self.candidates = np.zeros(slots, np.int32)  # each row's sampled, not yet emitted token
        self.waiting = queue.Queue()
        self.stats = dict(requests=0, completed=0, cancelled=0, failed=0, tokens=0, steps=0, batch_sizes=Counter())
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
        """Counters for /stats: rows in use, queue length, and how many rows each decode step ran."""
        busy = sum(r is not None for r in self.active)
        with self.stats_lock:
            stats = dict(self.stats, batch_sizes={str(k): v for k, v in sorted(self.stats["batch_sizes"].items())})
        return dict(stats, slots=self.slots, busy_slots=busy, free_slots=self.slots - busy, waiting=self.waiting.qsize())

    def close(self):
        self._stop.set()
        self.thread.join()

    # -----------------------------------------------------------------------------
    # the scheduler thread

    def _compile_all(self):
        """Run each static shape once: prompts padded to every bucket, decode steps over every window.
        Only free rows are touched, and whatever this writes into the cache is never read."""
        sizes, n = [], 16
        while (b := self.engine.bucket(n)) not in sizes:
            sizes.append(b)
            n *= 2
        zeros = np.zeros(self.slots, np.int32)
        knobs = (np.ones(self.slots, np.float32), np.full(self.slots, 50, np.int32), np.ones(self.slots, np.float32))
        for size in sizes:
            _, k_row, v_row, *_ = self.engine._start([0] * min(size, self.engine.max_len - 1), 1, 1.0, 50, 1.0, 0)
            self.k, self.v = self.engine._insert(self.k, self.v, k_row, v_row, 0)
            _, self.k, self.v = self.engine._step(self.engine.state, zeros, self.k, self.v, zeros, zeros, zeros, zeros, *knobs, window=size)

    def _run(self):
        if self.warmup:
            t0 = time.perf_counter()
            self._compile_all()
            print(f"scheduler: compiled all shapes in {time.perf_counter() - t0:.1f} s")
        self.ready.set()
        while not self._stop.is_set():
            try:
                self._admit()
                if not any(self.active):
                    continue
                self._emit()
                if any(self.active):
                    self._decode()
            except Exception as e:  # never let one bad step kill the server: fail the rows in flight
                for i, entry in enumerate(self.active):
                    if entry is not None:
                        entry[0].error = f"{type(e).__name__}: {e}"
                        self._finish(i, None, "failed")
                self.k, self.v = self.engine.new_cache(self.slots)  # a failed step may have consumed the donated cache

    def _admit(self):
        """Prefill waiting requests into free rows; block briefly when there is nothing to do."""
        while None in self.active:
            try:
                request = self.waiting.get(timeout=0.05 if not any(self.active) else 0)
            except queue.Empty:
                return
            if request.cancelled.is_set():
                self._close(request, None)
                continue
            slot = self.active.index(None)
            t, k, p = request.knobs
            first, k_row, v_row, *_ = self.engine._start(request.tokens, 1, t, k, p, request.seed)
            self.k, self.v = self.engine._insert(self.k, self.v, k_row, v_row, slot)
            self.active[slot] = (request, Row())
            self.pos[slot], self.candidates[slot] = len(request.tokens), int(np.asarray(first)[0])
            self.stats["requests"] += 1

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

    def _decode(self):
        """One step for every row at once; free rows decode a dummy token that is never read."""
        busy = np.array([entry is not None for entry in self.active])
        knobs = np.array([entry[0].knobs if entry else (0.0, 0, 1.0) for entry in self.active], np.float64)
        seeds = np.array([entry[0].seed if entry else 0 for entry in self.active], np.int32)
        steps = np.array([entry[0].generated if entry else 0 for entry in self.active], np.int32)
        pos = np.where(busy, self.pos, 0).astype(np.int32)  # fresh arrays: jax may read them after dispatch
        sampled, self.k, self.v = self.engine._step(
            self.engine.state, np.where(busy, self.candidates, 0).astype(np.int32), self.k, self.v, pos, seeds,
            np.zeros(self.slots, np.int32), steps, knobs[:, 0].astype(np.float32), knobs[:, 1].astype(np.int32),
            knobs[:, 2].astype(np.float32), window=self.engine.bucket(int(pos.max()) + 1))
        self.candidates = np.array(sampled)
        self.pos = self.pos + busy
        with self.stats_lock:
            self.stats["steps"] += 1
            self.stats["batch_sizes"][int(busy.sum())] += 1

    def _finish(self, slot, reason, outcome):
        self._close(self.active[slot][0], reason)
        self.active[slot] = None
        self.stats[outcome] += 1

    def _close(self, request, reason):
        request.finish_reason = reason
        request.events.put(None)
