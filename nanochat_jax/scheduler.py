"""
Continuous batching for the chat server. One thread owns the engine and a KV cache of `slots` rows;
requests from any number of threads queue up, are prefilled into free rows between decode rounds (those
that wait together as the rows of one prefill), and leave their row as soon as they finish or their
client goes away. Every round decodes all active rows together, so concurrent chats share the weight
reads instead of each holding a model; it runs only the first rows that cover the busy ones (a power of
four), so a lone chat does not pay for 32 rows of cache. A round is up to `chunk` steps of the engine's
device loop (Engine._loop, what generate_batch runs), so the host pays its per-call costs (dispatch, the
per-row inputs, reading tokens back, streaming them out) once per chunk instead of once per token; the loop
itself forces calculator results and stops a row at its stop token, and a round ends early when a row
closes a calculator call, which the host answers before the next.

    scheduler = Scheduler(engine, slots=32)
    request = scheduler.submit(prompt_ids, max_tokens=256, temperature=0.8, top_k=50)
    for token in request:  # generated ids as they come; request.finish_reason is then "stop" or "length"
        ...
"""
import os
import queue
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

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
    """A round whose sampling rows all take the top-k fast path (sampling_mode 2, the chat defaults; greedy rows
    may be beside them) compiles that path alone; any other mix picks its path on the device, by a switch.
    warmup=True compiles every prefill and decode shape before the first request is served (the server
    reports ready=False meanwhile), so no client ever waits for a compile. prefill_rows (a power of two): the
    most waiting requests prefilled together in one call, so a burst of clients waits for a few batched
    prefills instead of one prefill after another. chunk: the most decode steps in one round; a round right
    after a prefill runs Engine.CHECK_EVERY steps (the device loop's least, 8), so the new rows' first tokens go out
    without waiting for a whole chunk, and a request that arrives waits at most one round to be prefilled."""

    STATIC_MODE = 2  # sample_next's path compiled on its own: the top candidates (top-k <= TOP_K_FAST, any temperature)
    FREE = (Request([0], 0, 0.0, 0, 1.0, 0), Row())  # what a free row feeds the device loop: greedy, no tool state

    # the defaults, also web.server's and bench serve's. CHUNK: the host's costs come to ~3 ms a round (one H100,
    # d20, one chat: 1.05 ms a step in rounds of 16, 0.85 in rounds of 64, against the device loop's 0.84), and a
    # request that arrives during a round waits for its end (64 steps: ~55 ms there)
    SLOTS, PREFILL_ROWS, CHUNK = 32, 8, 64

    def __init__(self, engine, slots=SLOTS, warmup=False, prefill_rows=PREFILL_ROWS, chunk=CHUNK):
        if prefill_rows < 1 or prefill_rows & (prefill_rows - 1):
            raise ValueError(f"prefill_rows must be a power of two, got {prefill_rows}")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 step, got {chunk}")
        self.engine, self.slots, self.chunk = engine, slots, chunk
        self.prefill_rows = min(prefill_rows, 1 << (slots - 1).bit_length())
        self.k, self.v = engine.new_cache(slots)
        self.active = [None] * slots  # per row: (request, tool state) or None
        self.pos = np.zeros(slots, np.int32)  # where each row's next token goes in the cache
        self.candidates = np.zeros(slots, np.int32)  # each row's sampled, not yet emitted token
        self.waiting = queue.Queue()
        # round_s, prefill_s: the scheduler thread's seconds in decode rounds (from the call until the tokens are back
        # on the host) and in prefills; the rest of its time goes on emitting tokens, admitting and waiting
        self.stats = dict(requests=0, completed=0, cancelled=0, failed=0, tokens=0, steps=0, rounds=0, round_s=0.0, prefill_s=0.0,
                          batch_sizes=Counter(), prefill_sizes=Counter())
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
        rounds over every window. The prefills' rows are inserted past the batch, so nothing is written, and the
        rounds decode rows marked done, which stand still. The shapes are compiled first, side by side on a pool
        of threads (XLA compiles outside the interpreter lock: a GPU host has 16 cores or more); running them then
        finds them compiled."""
        sizes, n = [], 16
        while (b := self.engine.bucket(n)) not in sizes:
            sizes.append(b)
            n *= 2
        prefills = [[Request([0] * min(size, self.engine.max_len - 1), 1, 1.0, 50, 1.0, 0)] * rows
                    for size in sizes for rows in self._group_sizes()]
        rounds = [([None] * n, 1, size, mode) for size in sizes for n in self._step_rows() for mode in (None, self.STATIC_MODE)]
        calls = [self._prefill_call(group) for group in prefills] + [self._round_call(*r) for r in rounds]
        with ThreadPoolExecutor(min(len(calls), os.cpu_count() or 1)) as pool:  # list(): a failed compile raises here
            list(pool.map(lambda call: call[0].lower(*call[1], **call[2]).compile(), calls))
        for group in prefills:
            self._prefill(group, slots=[self.slots] * len(group))
        for r in rounds:
            self._round(*r)

    def _step_rows(self):
        """The row counts a decode round runs: powers of four below slots, and slots."""
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
                if any(self.active):
                    self._advance(admitted)
            except Exception as e:  # never let one bad step kill the server: fail the rows in flight
                for i, entry in enumerate(self.active):
                    if entry is not None:
                        entry[0].error = f"{type(e).__name__}: {e}"
                        self._finish(i, None, "failed")
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
            t0 = time.perf_counter()
            self._prefill(group, slots)
            self.stats["requests"] += len(group)
            with self.stats_lock:
                self.stats["prefill_sizes"][len(group)] += 1
                self.stats["prefill_s"] += time.perf_counter() - t0
        return admitted

    def _prefill_call(self, group):
        """(the engine's jitted prefill, its arguments, static arguments) for the group's prompts as the rows of one
        call, padded to the next group size (padding rows repeat the first prompt)."""
        rows = next(n for n in self._group_sizes() if n >= len(group))
        padded = group + [group[0]] * (rows - len(group))
        lengths = np.array([len(r.tokens) for r in padded], np.int32)
        tokens = np.zeros((rows, self.engine.bucket(lengths.max())), np.int32)
        for i, r in enumerate(padded):
            tokens[i, :len(r.tokens)] = r.tokens
        knobs = np.array([r.knobs for r in padded], np.float64)
        return self.engine._prefill, (self.engine.state, tokens, lengths, np.array([r.seed for r in padded], np.int32), np.zeros(rows, np.int32),
                                      knobs[:, 0].astype(np.float32), knobs[:, 1].astype(np.int32), knobs[:, 2].astype(np.float32)), {}

    def _prefill(self, group, slots):
        """Prefill the group's prompts in one call (_prefill_call) and put each row's cache into its slot; padding
        rows are not inserted."""
        fn, args, static = self._prefill_call(group)
        first, k_rows, v_rows = fn(*args, **static)
        rows = len(args[1])  # the group padded: args[1] is the tokens (rows, bucket)
        targets = np.array(list(slots) + [self.slots] * (rows - len(group)), np.int32)  # past the batch: dropped
        self.k, self.v = self.engine._insert(self.k, self.v, k_rows, v_rows, targets)
        first = np.asarray(first)
        for i, (request, slot) in enumerate(zip(group, slots)):
            if slot < self.slots:
                self.pos[slot], self.candidates[slot] = len(request.tokens), int(first[i])

    def _advance(self, admitted):
        """One round: decode the busy rows on the device loop, then hand each row the tokens it recorded (the
        tool state runs over them on the host, as it did on the device) and retire finished rows. A round runs
        up to chunk steps, no more than the busiest row still wants, and the device loop's least right after a
        prefill (a round of fewer steps still takes that many: the steps past its end change nothing)."""
        for i, entry in enumerate(self.active):
            if entry is not None and entry[0].cancelled.is_set():
                self._finish(i, None, "cancelled")
        busy = np.array([entry is not None for entry in self.active])
        if not busy.any():
            return
        entries = self.active[:self._rows(busy)]
        wanted = max(entry[0].max_tokens - entry[0].generated for entry in entries if entry)
        limit = max(1, min(self.engine.CHECK_EVERY if admitted else self.chunk, wanted))
        t0 = time.perf_counter()
        c = self._round(entries, limit)
        out, n_out, self.candidates[:len(entries)], new_pos = (np.asarray(c[name]) for name in ("out", "n_out", "candidate", "pos"))
        with self.stats_lock:
            self.stats["steps"] += int(c["step"])
            self.stats["rounds"] += 1
            self.stats["round_s"] += time.perf_counter() - t0
            self.stats["batch_sizes"][int(busy.sum())] += int(c["step"])
        for i, entry in enumerate(entries):
            if entry is None:
                continue
            for j in range(n_out[i]):
                if not self._emit(i, int(out[i, j]), self.pos[i] + j):
                    break
            if self.active[i] is not None:
                self.pos[i] = new_pos[i]

    def _round(self, entries, limit, window=None, mode=False):
        """Run the device loop for up to limit steps over the first len(entries) rows (None: a free row, which
        stands still); returns the loop's final state. window None: one that covers every step of the round;
        mode False: the one these rows' knobs need."""
        fn, args, static = self._round_call(entries, limit, window, mode)
        self.k, self.v, c = fn(*args, **static)
        return c

    def _round_call(self, entries, limit, window=None, mode=False):
        """(the engine's jitted device loop, its arguments, static arguments) for a round (_round)."""
        n, engine = len(entries), self.engine
        rows = [entry or self.FREE for entry in entries]
        forced = np.zeros((n, engine.FORCED), np.int32)  # a row's forced tokens fit: Engine.tool_output checks
        for i, (_, row) in enumerate(rows):
            forced[i, :len(row.forced)] = list(row.forced)
        knobs = np.array([r.knobs for r, _ in rows], np.float64)
        knobs = knobs[:, 0].astype(np.float32), knobs[:, 1].astype(np.int32), knobs[:, 2].astype(np.float32)
        if mode is False:
            mode = self.STATIC_MODE if sampling_mode(*knobs) == self.STATIC_MODE else None
        pos = np.array([self.pos[i] if entry else 0 for i, entry in enumerate(entries)], np.int32)
        window = window or engine.bucket(int(pos.max()) + limit + 1)
        c = dict(engine._carry(self.candidates[:n].copy(), pos, self.chunk), limit=np.int32(limit), forced=forced,
                 done=np.array([entry is None for entry in entries]), base=np.array([r.generated for r, _ in rows], np.int32),
                 in_python=np.array([row.in_python for _, row in rows]), n_forced=np.array([len(row.forced) for _, row in rows], np.int32))
        seeds = np.array([r.seed for r, _ in rows], np.int32)
        return engine._loop, (engine.state, self.k, self.v, c, seeds, np.zeros(n, np.int32), *knobs), dict(window=window, mode=mode)

    def _emit(self, i, token, pos):
        """Hand row i its next token, which was fed at pos (the calculator's state machine sees it, and forces
        what the device loop forced); retire the row when it is done. Returns whether the row goes on."""
        request, row = self.active[i]
        if request.cancelled.is_set():
            self._finish(i, None, "cancelled")
            return False
        token, _ = self.engine.next_token(row, token)
        request.generated += 1
        self.stats["tokens"] += 1
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if token in self.engine.stop_ids:
            self._finish(i, "stop", "completed")
            return False
        request.events.put(token)
        if request.generated >= request.max_tokens or pos >= self.engine.max_len:
            self._finish(i, "length", "completed")  # max_tokens, or the cache is full
            return False
        return True

    def _rows(self, busy):
        """The rows a round decodes: the fewest of _step_rows that cover every busy row."""
        return next(n for n in self._step_rows() if n > np.flatnonzero(busy).max())

    def _finish(self, slot, reason, outcome):
        self._close(self.active[slot][0], reason)
        self.active[slot] = None
        self.stats[outcome] += 1

    def _close(self, request, reason):
        request.finish_reason = reason
        request.events.put(None)
