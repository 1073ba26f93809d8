"""Continuous batching: a fixed number of decode slots over one preallocated cache.

```python
engine = Engine(model, slots=8, max_length=2048)
engine.start()                                   # warm-up (compiles every program), then a worker thread
stream = engine.submit(ids, max_tokens=64)       # returns at once; iterate for Events
for event in stream: ...
```

Each step of the worker runs at most one prefill chunk of the requests being admitted (up to
``prefill_rows`` waiting prompts together, each in a row of a scratch cache, left-padded to a common
length; ``chunk`` tokens a row) and then one decode step of every active slot, so new requests' prefill is
interleaved with the others' decoding. When their prompts are in, each request's first token is drawn and
its row is copied into a free slot (``slots.insert``); a finished or cancelled request frees its slot at
once. Sampling is per request (temperature, top-k, top-p, seed; drawn as ``generate``
draws it); stop strings and EOS ids end a request. The programs have fixed shapes: after ``warm_up`` no
request compiles anything (``Engine.compiles`` counts any that do).

Prefix reuse: the state after each prompt and after each finished request (prompt and reply) is kept, up to
``prefix_entries`` snapshots; a prompt that extends a snapshot's tokens starts from it and prefills only the
rest.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers.decoders import DecodeStream

from ..api import Jamba, mesh_context
from ..generate import encode_prompts, stop_token_ids
from ..steps import ModelSpec, init_cache
from . import slots as programs

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
DEFAULT_CHUNK = 128  # prompt tokens per scheduling step; a short prompt's first token waits for one chunk
# Decode steps per call while every slot is busy: the host's per-call work (dispatch, taking the tokens) is
# paid once for them; a finished request's slot waits for the call to end.
DEFAULT_DECODE_STEPS = 4
COALESCE_S = 0.002  # an idle engine waits this long after a request arrives, so a burst is prefilled together


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound (an HTTP server answers 429)."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request produced in one step: a new ``token`` (None in the final event) and the ``text`` it
    adds (held back while it could be the start of a stop string or of a UTF-8 character; "" without a
    tokenizer), and, in the last event, ``finish_reason``: ``"stop"`` (EOS or a stop string), ``"length"``
    (``max_tokens``) or ``"cancelled"``."""

    token: int | None
    text: str = ""
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Params:
    """One request's generation settings (checked here: a bad value is a ``ValueError`` naming it)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        def integer(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not integer(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if self.top_k is not None and (not integer(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not integer(self.seed) or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")


class Stream:
    """A submitted request: iterate it for its ``Event``s (blocking), or give ``submit`` a ``listener``.
    ``tokens`` holds the new tokens so far, ``text`` their text (cut before a stop string), ``finish_reason``
    is set at the end; ``cancel()`` frees its slot at the engine's next step."""

    def __init__(self, prompt: list[int], params: Params, listener: Callable[[Event], None] | None):
        self.prompt, self.params = prompt, params
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.reused_tokens = 0  # prompt tokens taken from a snapshot instead of prefilled
        self._queue: queue.Queue | None = None if listener else queue.Queue()
        self._ended = False  # the final event was taken from the queue
        self._listener = listener or self._queue.put

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Event) -> None:
        self._listener(event)

    def __iter__(self):
        if self._queue is None:
            raise TypeError("this stream reports to its listener")
        while not self._ended:
            event = self._queue.get()
            self._ended = event.finish_reason is not None
            yield event

    def result(self) -> "Stream":
        """Waits for the end; returns self."""
        for _ in self:
            pass
        return self


class _Text:
    """A request's text as tokens arrive: stop strings end it, and what is emitted is never taken back.

    The text grows by each new token's piece (``tokenizers.decoders.DecodeStream``, which holds back a
    partial UTF-8 character), so a token costs the same however long the request: decoding the whole
    list at every token made a long generation quadratic."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop, self.emitted, self.stopped = tokenizer, tuple(stop), "", False
        self._pieces = DecodeStream(skip_special_tokens=True) if tokenizer is not None else None
        self._text = ""  # the text of the tokens taken so far (whole characters), as ``decode`` gives it
        self._taken = 0  # tokens given to ``_pieces``

    def update(self, tokens: list[int]) -> tuple[str, int | None]:
        """(new text safe to emit, the number of tokens to keep if a stop string was reached, else None)."""
        if self.tokenizer is None:
            return "", None
        searched = len(self._text)
        for token in tokens[self._taken:]:
            self._text += self._pieces.step(self.tokenizer, token) or ""
        self._taken = len(tokens)
        text = self._text
        # A stop string not in the text before ends in its new part.
        cuts = [i for s in self.stop if (i := text.find(s, max(0, searched - len(s) + 1))) >= 0]
        if cuts:
            keep = len(tokens)
            while keep and any(s in self.tokenizer.decode(tokens[:keep]) for s in self.stop):
                keep -= 1
            self.stopped = True
            return self._emit(text[:min(cuts)]), keep
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return self._emit(text[:len(text) - hold]), None

    def final(self, tokens: list[int]) -> str:
        """The rest of the text at the end (nothing more after a stop string)."""
        if self.tokenizer is None or self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(tokens))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new


@dataclasses.dataclass
class _Active:
    stream: Stream
    text: _Text
    generated: list[int] = dataclasses.field(default_factory=list)  # every new token (never cut by a stop)
    fed: int = 0  # new tokens whose state is in the row (after every dispatched step); the prompt's always is

    def fed_tokens(self) -> tuple[int, ...]:
        return tuple(self.stream.prompt) + tuple(self.generated[:self.fed])


@dataclasses.dataclass
class _Step:
    """A dispatched decode call: ``tokens [steps, slots]`` (on device, each row's new tokens), who each row
    held when it was dispatched (None: masked) and how many steps each row runs."""

    tokens: jax.Array
    rows: list[_Active | None]
    budget: np.ndarray


@dataclasses.dataclass
class _Prefill:
    """Prompts being prefilled together: ``streams[i]`` in scratch row ``i``, bound for slot ``slots[i]``."""

    streams: list[Stream]
    slots: list[int]
    pieces: list[tuple[np.ndarray, np.ndarray]]  # (ids, valid) [rows, size] each, in order
    start: int = -1  # where the first piece goes (-1: the scratch's pos, as a snapshot left it)


class Engine:
    """Continuous batching over ``slots`` decode slots for ``model`` (any ``jamba_jax.load`` model; a
    mesh shards the slot cache by the cache table's rules).

    ``max_length``: the most tokens (prompt + new) of one request. ``chunk``: prompt tokens per row and step.
    ``prefill_rows``: prompts prefilled together (default ``min(slots, 8)``; the scratch cache's rows).
    ``decode_steps``: decode steps per call while every slot is busy (one otherwise, so that an arrival waits
    for one step at most).
    ``queue_size``: requests waiting for a slot before ``submit`` raises ``QueueFull``.
    ``prefix_entries``: snapshots kept for prefix reuse (0: none)."""

    def __init__(self, model: Jamba, *, slots: int = 8, max_length: int = 2048, chunk: int = DEFAULT_CHUNK,
                 prefill_rows: int | None = None, decode_steps: int = DEFAULT_DECODE_STEPS, queue_size: int = 64,
                 prefix_entries: int = 8, eos: Sequence[int] | None = None):
        prefill_rows = min(slots, 8) if prefill_rows is None else prefill_rows
        for name, value, low in (("slots", slots, 1), ("max_length", max_length, 2), ("chunk", chunk, 1),
                                 ("prefill_rows", prefill_rows, 1), ("decode_steps", decode_steps, 1),
                                 ("queue_size", queue_size, 0),
                                 ("prefix_entries", prefix_entries, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.model, self.spec = model, ModelSpec.of(model)
        self.slots, self.max_length, self.chunk = slots, max_length, chunk
        self.prefill_rows = min(prefill_rows, slots)
        self.decode_steps = decode_steps
        # A group of n prompts runs on the first ``row_bucket(n)`` scratch rows: one program per bucket.
        self.row_buckets = sorted({1 << b for b in range(self.prefill_rows.bit_length())
                                   if 1 << b < self.prefill_rows} | {self.prefill_rows})
        self.queue_size, self.prefix_entries = queue_size, prefix_entries
        self.eos = tuple(int(t) for t in eos) if eos is not None else tuple(stop_token_ids(model))
        # Rows hold at most ``span`` tokens; the cache twice that, so ``compact`` runs once every ``span`` steps.
        self.span = -(-max_length // chunk) * chunk
        self.length = 2 * self.span
        with mesh_context(model):
            self.cache = init_cache(model, slots, self.length)
            self.scratch = init_cache(model, self.prefill_rows, self.length)
        self._reset = programs.resetter(self.scratch)
        self.cache["pos"] = jnp.asarray(self.span, jnp.int32)
        self.pos = self.span
        self._active: list[_Active | None] = [None] * slots
        self._reserved: set[int] = set()
        self._prefill: _Prefill | None = None
        self._waiting: collections.deque[Stream] = collections.deque()
        self._snapshots: collections.OrderedDict[tuple[int, ...], dict] = collections.OrderedDict()
        # Decode steps are pipelined: step k+1 is dispatched before step k's tokens reach the host, so the
        # host's work on them overlaps the device's on the next step. Each step's tokens and PRNG keys stay
        # on the device and feed the next; rows inserted since the last step (``_fresh``) bring their first
        # token and key from the host.
        self._inflight: _Step | None = None
        self._device_tokens = jnp.zeros(slots, jnp.int32)
        self._device_keys = jnp.zeros((slots, 2), jnp.uint32)
        self._fresh = np.zeros(slots, bool)
        self._tokens = np.zeros(slots, np.int32)
        self._key_data = np.zeros((slots, 2), np.uint32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.error: BaseException | None = None
        self.compiles = 0  # compiles in the worker after warm-up (should stay 0)
        self.steps = 0
        self.compactions = 0
        self.prefill_groups: collections.Counter[int] = collections.Counter()  # prompts prefilled together
        self.decode_calls: collections.Counter[int] = collections.Counter()  # calls by decode steps per call
        self.reused_tokens = 0  # prompt tokens taken from snapshots, all requests
        self._counting = False
        self._warming = False
        # A JAX without these hooks leaves ``compiles`` at 0.
        self._listening = hasattr(jax.monitoring, "unregister_event_duration_listener")
        if self._listening:
            jax.monitoring.register_event_duration_secs_listener(self._on_compile)

    # ---- public API -------------------------------------------------------------------------------------

    def encode(self, prompt) -> list[int]:
        """A prompt (text, needs the tokenizer, or token ids) as token ids."""
        return encode_prompts(self.model, [prompt] if isinstance(prompt, str) else [list(prompt)])[0]

    def submit(self, prompt, params: Params | None = None, *, listener: Callable[[Event], None] | None = None,
               **settings) -> Stream:
        """Queues a request (``prompt``: text or token ids; ``params`` or its fields as keywords) and returns its
        ``Stream``. A ``ValueError`` for a bad request, ``QueueFull`` when the queue is at its bound."""
        params = params or Params(**settings)
        ids = self.encode(prompt)
        if params.stop and self.model.tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer")
        if len(ids) + params.max_tokens > self.max_length:
            raise ValueError(f"the prompt's {len(ids)} tokens plus max_tokens={params.max_tokens} exceed the "
                             f"server's max length of {self.max_length} tokens; shorten the prompt or max_tokens")
        stream = Stream(ids, params, listener)
        with self._cond:
            if self.error is not None:
                raise RuntimeError(f"the engine stopped: {self.error}")
            if len(self._waiting) >= self.queue_size + len(self._free_slots()):
                raise QueueFull(f"{len(self._waiting)} requests are waiting; try again later")
            self._waiting.append(stream)
            self._cond.notify()
        return stream

    def start(self, warm_up: bool = True) -> "Engine":
        """Compiles every program (``warm_up``), then runs the worker thread."""
        if warm_up:
            self.warm_up()
        self._thread = threading.Thread(target=self._run, name="jamba-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        if self._listening:
            jax.monitoring.unregister_event_duration_listener(self._on_compile)
            self._listening = False

    @property
    def busy_slots(self) -> int:
        return self.slots - len(self._free_slots())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def warm_up(self) -> None:
        """Runs every program once (a two-chunk request that reuses a snapshot and is cancelled after a step,
        a group of prompts for each row bucket, and one compaction), so that no request compiles; the state is
        left empty."""
        self._warming, keep = True, self.prefix_entries  # random tokens: EOS ends nothing
        self.prefix_entries = max(1, keep)
        try:
            # Under the mesh, as step() runs them: a program traced outside it is another cache entry.
            with mesh_context(self.model):
                self._run_every_program()
        finally:
            self._warming, self.prefix_entries = False, keep
        self.pos = self.span
        self.cache["pos"] = jnp.asarray(self.span, jnp.int32)
        self._snapshots.clear()
        self.prefill_groups.clear()
        self.decode_calls.clear()
        self._counting = True

    def _run_every_program(self) -> None:
        vocab = self.model.config.vocab_size
        prompt = [1 + i % (vocab - 1) for i in range(max(1, min(self.chunk + 1, self.max_length // 2)))]
        stream = self.submit(prompt, Params(max_tokens=3, temperature=1.0, top_k=5, top_p=0.9))
        while stream.finish_reason is None:
            self.step()
        reuse = self.submit(prompt + stream.tokens[:-1] + [1], Params(max_tokens=2))
        self.step()
        reuse.cancel()
        while reuse.finish_reason is None:
            self.step()
        self._snapshots.clear()
        for rows in self.row_buckets[1:]:  # groups of prompts: one program per bucket
            group = [self.submit([1 + i % (vocab - 1)], Params(max_tokens=1)) for i in range(rows)]
            while any(s.finish_reason is None for s in group):
                self.step()
        self._drain()
        if self.decode_steps > 1:  # calls of several steps (all rows masked: nothing changes but pos)
            self._decode_call(np.zeros(self.slots, np.int32), self.decode_steps)
        self.cache = programs.compact(self.cache, span=self.span)
        for size in {1 << b for b in range(max(self.chunk - 1, 1).bit_length())} - {self.chunk}:
            ids, valid = np.zeros((1, size), np.int32), np.zeros((1, size), bool)  # valid: no-op pieces
            _, self.scratch = programs.prefill_rows(self.model.params, self.scratch, ids, valid, np.int32(0),
                                                    spec=self.spec)
        self.scratch = self._reset(self.scratch, np.int32(0))

    # ---- the worker ---------------------------------------------------------------------------------------

    def _on_compile(self, event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT and self._counting and threading.current_thread() is self._thread:
            self.compiles += 1

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    idle = not self._has_work()
                    while not self._closing and not self._has_work():
                        self._cond.wait()
                    if self._closing:
                        break
                if idle:
                    time.sleep(COALESCE_S)
                self.step()
        except BaseException as e:  # noqa: BLE001 -- reported to every request, then to submit()
            self.error = e
            for stream in self._all_streams():
                stream.finish_reason = "error"
                stream.emit(Event(None, "", "error"))

    def _all_streams(self) -> list[Stream]:
        out = [a.stream for a in self._active if a is not None] + list(self._waiting)
        return out + ([s for s in self._prefill.streams if s is not None] if self._prefill is not None else [])

    def _has_work(self) -> bool:
        return (bool(self._waiting) or self._prefill is not None or self._inflight is not None
                or any(a is not None for a in self._active))

    def step(self) -> None:
        """One scheduling step: drop cancelled requests, run a prefill chunk, dispatch a decode call, then take
        the tokens of the call dispatched before it (so the host's work overlaps the device's). While a slot
        is free the new call's tokens are taken too: a request arriving meanwhile then waits for one decode
        step at most, not for the one in flight and the one queued behind it."""
        self._drop_cancelled()
        with mesh_context(self.model):
            if self._prefill is None:
                self._admit()
            if self._prefill is not None:
                self._prefill_step()
            done, self._inflight = self._inflight, self._dispatch(self._inflight)
            if done is not None:
                self._take(done)
            if not self._slots_full():
                self._drain()
        self.steps += 1

    def _free_slots(self) -> list[int]:
        """The slots that hold no request and are not reserved for one being prefilled."""
        return [i for i, a in enumerate(self._active) if a is None and i not in self._reserved]

    def _slots_full(self) -> bool:
        """Every slot holds a request or is reserved for one being prefilled: nothing can be admitted."""
        return not self._free_slots()

    def _drain(self) -> None:
        """Takes the tokens of the step in flight, if any."""
        done, self._inflight = self._inflight, None
        if done is not None:
            self._take(done)

    def _drop_cancelled(self) -> None:
        with self._cond:
            for stream in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(stream)
                self._finish_stream(stream, "cancelled", None)
        job = self._prefill
        if job is not None:
            for i, stream in enumerate(job.streams):
                if stream is not None and stream.cancelled:
                    job.streams[i] = None  # its row runs on with the group, then is dropped
                    self._reserved.discard(job.slots[i])
                    self._finish_stream(stream, "cancelled", None)
            if not any(job.streams):
                self._end_prefill()
        for slot, active in enumerate(self._active):
            if active is not None and active.stream.cancelled:
                self._release(slot, "cancelled")

    def _base(self, ids: list[int]) -> tuple[int, ...] | None:
        """The longest snapshot whose tokens ``ids`` extends (None: no snapshot)."""
        return max((t for t in self._snapshots if len(t) < len(ids) and tuple(ids[:len(t)]) == t),
                   key=len, default=None)

    def _admit(self) -> None:
        """Starts prefilling the next waiting prompts: one that extends a snapshot alone (from the snapshot),
        else up to ``prefill_rows`` fresh ones (as many as there are free slots) together."""
        with self._cond:
            free = self._free_slots()
            group, base = [], None
            while self._waiting and len(group) < min(len(free), self.prefill_rows):
                found = self._base(self._waiting[0].prompt)
                if found is not None and group:
                    break  # a snapshot's continuation starts the next group, alone
                group.append(self._waiting.popleft())
                if found is not None:
                    base = found
                    break
        if not group:
            return
        slots = free[:len(group)]
        self._reserved.update(slots)
        if base is not None:
            # Padding is exact only before a sequence's first token (the conv would see its zeros), so the
            # rest of a prompt that continues a snapshot goes in unpadded pieces: whole chunks, then powers of two.
            stream = group[0]
            rest = np.asarray(stream.prompt[len(base):], np.int32)[None]
            self._snapshots.move_to_end(base)
            self.scratch = programs.restore(self.scratch, self._snapshots[base])
            stream.reused_tokens = len(base)
            self.reused_tokens += len(base)
            starts = np.cumsum([0, *self._piece_sizes(rest.shape[1])])
            pieces = [(rest[:, a:b], np.ones((1, b - a), bool)) for a, b in zip(starts, starts[1:])]
            start = -1  # where the snapshot ends
        else:
            rows = next(b for b in self.row_buckets if b >= len(group))
            padded = -(-max(len(s.prompt) for s in group) // self.chunk) * self.chunk
            start = self.span - padded  # the scratch is empty (``_end_prefill``)
            ids, valid = np.zeros((rows, padded), np.int32), np.zeros((rows, padded), bool)
            for row, stream in enumerate(group):
                ids[row, padded - len(stream.prompt):] = stream.prompt
                valid[row, padded - len(stream.prompt):] = True
            pieces = [(ids[:, i:i + self.chunk], valid[:, i:i + self.chunk]) for i in range(0, padded, self.chunk)]
        self._prefill = _Prefill(group, slots, pieces, start)
        self.prefill_groups[len(group)] += 1

    def _piece_sizes(self, n: int) -> list[int]:
        """Unpadded piece lengths for ``n`` tokens: whole chunks, then the binary digits of the rest."""
        full, rest = divmod(n, self.chunk)
        return [self.chunk] * full + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]

    def _prefill_step(self) -> None:
        job = self._prefill
        ids, valid = job.pieces.pop(0)
        logits, self.scratch = programs.prefill_rows(self.model.params, self.scratch, ids, valid,
                                                     np.int32(job.start), spec=self.spec)
        job.start = -1
        if job.pieces:
            return
        rows = ids.shape[0]
        settings = [s.params if s is not None else Params() for s in job.streams]
        settings += [Params()] * (rows - len(settings))
        tokens, key_data = programs.first_token(logits, np.array([p.seed for p in settings], np.int32),
                                                np.array([p.temperature for p in settings], np.float32),
                                                np.array([p.top_k or 0 for p in settings], np.int32),
                                                np.array([p.top_p or 1.0 for p in settings], np.float32))
        tokens, key_data = np.asarray(tokens), np.asarray(key_data)
        admitted = []
        for row, (stream, slot) in enumerate(zip(job.streams, job.slots)):
            if stream is None:
                continue
            active = _Active(stream, _Text(self.model.tokenizer, stream.params.stop))
            stream.first_token_at = time.perf_counter()
            if self._accept(active, int(tokens[row])):
                self._reserved.discard(slot)
            else:
                admitted.append((row, slot, active))
        # The first tokens are out; now the copies: each prompt's snapshot and its row into its slot.
        for row, stream in enumerate(job.streams):
            if stream is not None:
                self._snapshot(tuple(stream.prompt), self.scratch, row)
        for row, slot, active in admitted:
            self.cache = programs.insert(self.cache, self.scratch, np.int32(row), np.int32(slot))
            self._active[slot] = active
            self._reserved.discard(slot)  # held until now, so the slot counts as busy throughout
            self._fresh[slot] = True
            self._tokens[slot] = active.stream.tokens[-1]
            self._key_data[slot] = key_data[row]
            self._temperature[slot] = active.stream.params.temperature
            self._top_k[slot] = active.stream.params.top_k or 0
            self._top_p[slot] = active.stream.params.top_p or 1.0
        self._end_prefill()

    def _end_prefill(self) -> None:
        """No prompt is being prefilled; the scratch is emptied for the next (off the first tokens' path)."""
        self._prefill = None
        self.scratch = self._reset(self.scratch, np.int32(0))

    def _dispatch(self, inflight: _Step | None) -> _Step | None:
        """Dispatches decode steps of every row that needs them (None: no row does): ``decode_steps`` of them
        when no slot is free and no prompt is being prefilled (nothing could be admitted meanwhile), else one.
        A row in the call in flight goes on from that call's last token, unknown here yet; each row runs
        only the steps that its ``max_tokens`` leaves (its last token is never fed)."""
        budget = np.zeros(self.slots, np.int32)
        for slot, a in enumerate(self._active):
            if a is not None:
                pending = inflight.budget[slot] if inflight is not None and inflight.rows[slot] is a else 0
                budget[slot] = max(0, a.stream.params.max_tokens - len(a.generated) - pending)
        if not budget.any():
            return None
        full = self._prefill is None and self._slots_full()
        steps = self.decode_steps if full and self.pos + self.decode_steps <= self.length else 1
        self._compact_if_full()
        budget = np.minimum(budget, steps)
        new = self._decode_call(budget, steps)
        rows = [a if b else None for a, b in zip(self._active, budget)]
        for a, b in zip(rows, budget):
            if a is not None:
                a.fed += int(b)
        return _Step(new, rows, budget)

    def _decode_call(self, budget: np.ndarray, steps: int) -> jax.Array:
        """Runs ``slots.decode_steps`` on the slot cache (``budget [slots]`` steps a row); its new tokens."""
        # Copies: the call may read its host arguments after it returns (on CPU without copying them), and
        # these arrays change in place.
        host = [a.copy() for a in (self._fresh, self._tokens, self._key_data, budget, self._temperature,
                                   self._top_k, self._top_p)]
        new, self._device_tokens, self._device_keys, self.cache = programs.decode_steps(
            self.model.params, self.cache, self._device_tokens, self._device_keys, *host, spec=self.spec,
            steps=steps, eos=self.eos)
        self._fresh[:] = False
        self.pos += steps
        self.decode_calls[steps] += 1
        return new

    def _take(self, step: _Step) -> None:
        """Hands each row's new tokens from ``step`` to its request, in order (a row freed meanwhile, or
        finished by one of them, takes no more)."""
        new = np.asarray(step.tokens)
        for j in range(new.shape[0]):
            for slot, a in enumerate(step.rows):
                if a is not None and j < step.budget[slot] and self._active[slot] is a:
                    self._accept(a, int(new[j, slot]), slot)

    def _compact_if_full(self) -> None:
        if self.pos >= self.length:  # (calls of several steps end at the cache's end at the latest)
            self.cache = programs.compact(self.cache, span=self.span)
            self.pos -= self.span
            self.compactions += 1

    def _accept(self, active: _Active, token: int, slot: int | None = None) -> bool:
        """Adds a new token to a request; True (and the request finished, its slot freed) when it ends."""
        stream = active.stream
        stream.tokens.append(token)
        active.generated.append(token)
        text, keep = active.text.update(stream.tokens)
        reason = None
        if keep is not None:
            del stream.tokens[keep:]
            reason = "stop"
        elif token in self.eos and not self._warming:
            reason = "stop"
            active.fed = min(active.fed, len(active.generated) - 1)  # the device never feeds an EOS
        elif len(stream.tokens) >= stream.params.max_tokens:
            reason = "length"
        if reason is None:
            stream.emit(Event(token, text))
            return False
        if text:
            stream.emit(Event(token, text))
        if slot is not None:
            self._release(slot, reason)
        else:
            self._finish_stream(stream, reason, active.text)
        return True

    def _release(self, slot: int, reason: str) -> None:
        active = self._active[slot]
        self._active[slot] = None
        if 0 < active.fed <= len(active.generated):  # else the state holds tokens still in flight
            self._snapshot(active.fed_tokens(), self.cache, slot)
        self._finish_stream(active.stream, reason, active.text)

    def _finish_stream(self, stream: Stream, reason: str, text: _Text | None) -> None:
        tail = text.final(stream.tokens) if text is not None and reason != "cancelled" else ""
        stream.text = text.emitted if text is not None else ""
        stream.finish_reason = reason
        stream.emit(Event(None, tail, reason))

    def _snapshot(self, tokens: tuple[int, ...], cache: dict, row: int) -> None:
        if not self.prefix_entries or len(tokens) > self.span:
            return
        self._snapshots[tokens] = programs.take_row(cache, np.int32(row), span=self.span)
        self._snapshots.move_to_end(tokens)
        while len(self._snapshots) > self.prefix_entries:
            self._snapshots.popitem(last=False)
