"""Continuous batching: a fixed number of decode slots over one preallocated cache.

```python
engine = Engine(model, slots=8, max_length=2048)
engine.start()                                   # warm-up (compiles every program), then a worker thread
stream = engine.submit(ids, max_tokens=64)       # returns at once; iterate for Events
for event in stream: ...
```

Each step of the worker runs at most one prefill chunk of the request being admitted (into a one-row
scratch cache; ``chunk`` tokens, left-padded) and then one decode step of every active slot, so a new
request's prefill is interleaved with the others' decoding. When its prompt is in, the request's first
token is drawn and its row is copied into a free slot (``slots.insert``); a finished or cancelled request
frees its slot at once. Sampling is per request (temperature, top-k, top-p, seed; drawn as ``generate``
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

from ..api import Jamba, mesh_context
from ..generate import encode_prompts, stop_token_ids
from ..steps import ModelSpec, init_cache, prefill_chunk
from . import slots as programs

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
DEFAULT_CHUNK = 128  # prompt tokens per scheduling step; a short prompt's first token waits for one chunk


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
    """A request's text as tokens arrive: stop strings end it, and what is emitted is never taken back."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop, self.emitted, self.stopped = tokenizer, tuple(stop), "", False

    def update(self, tokens: list[int]) -> tuple[str, int | None]:
        """(new text safe to emit, the number of tokens to keep if a stop string was reached, else None)."""
        if self.tokenizer is None:
            return "", None
        text = self.tokenizer.decode(tokens)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            keep = len(tokens)
            while keep and any(s in self.tokenizer.decode(tokens[:keep]) for s in self.stop):
                keep -= 1
            self.stopped = True
            return self._emit(text[:min(cuts)]), keep
        safe = text.rstrip("\ufffd")
        hold = max((n for s in self.stop for n in range(1, len(s)) if safe.endswith(s[:n])), default=0)
        return self._emit(safe[:len(safe) - hold]), None

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
    fed: list[int]  # tokens whose state is in the row: the prompt, then all new tokens but the last


@dataclasses.dataclass
class _Prefill:
    stream: Stream
    slot: int
    pieces: list[tuple[np.ndarray, np.ndarray]]  # (ids, valid) [1, chunk] each, in order


class Engine:
    """Continuous batching over ``slots`` decode slots for ``model`` (any ``jamba_jax.load`` model; a
    mesh shards the slot cache by the cache table's rules).

    ``max_length``: the most tokens (prompt + new) of one request. ``chunk``: prompt tokens per step.
    ``queue_size``: requests waiting for a slot before ``submit`` raises ``QueueFull``.
    ``prefix_entries``: snapshots kept for prefix reuse (0: none)."""

    def __init__(self, model: Jamba, *, slots: int = 8, max_length: int = 2048, chunk: int = DEFAULT_CHUNK,
                 queue_size: int = 64, prefix_entries: int = 8, eos: Sequence[int] | None = None):
        for name, value, low in (("slots", slots, 1), ("max_length", max_length, 2), ("chunk", chunk, 1),
                                 ("queue_size", queue_size, 0), ("prefix_entries", prefix_entries, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.model, self.spec = model, ModelSpec.of(model)
        self.slots, self.max_length, self.chunk = slots, max_length, chunk
        self.queue_size, self.prefix_entries = queue_size, prefix_entries
        self.eos = tuple(eos) if eos is not None else stop_token_ids(model)
        # Rows hold at most ``span`` tokens; the cache twice that, so ``compact`` runs once every ``span`` steps.
        self.span = -(-max_length // chunk) * chunk
        self.length = 2 * self.span
        with mesh_context(model):
            self.cache = init_cache(model, slots, self.length)
            self.scratch = init_cache(model, 1, self.length)
        self.cache["pos"] = jnp.asarray(self.span, jnp.int32)
        self.pos = self.span
        self._active: list[_Active | None] = [None] * slots
        self._reserved: set[int] = set()
        self._prefill: _Prefill | None = None
        self._waiting: collections.deque[Stream] = collections.deque()
        self._snapshots: collections.OrderedDict[tuple[int, ...], dict] = collections.OrderedDict()
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
        self.reused_tokens = 0  # prompt tokens taken from snapshots, all requests
        self._counting = False
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
            free = sum(a is None and i not in self._reserved for i, a in enumerate(self._active))
            if len(self._waiting) >= self.queue_size + free:
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
        reserved = set(self._reserved)
        return sum(a is not None or i in reserved for i, a in enumerate(self._active))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def warm_up(self) -> None:
        """Runs every program once (a two-chunk request that reuses a snapshot and is cancelled after a step,
        and one compaction), so that no request compiles; the state is left empty."""
        vocab, eos = self.model.config.vocab_size, self.eos
        prompt = [1 + i % (vocab - 1) for i in range(max(1, min(self.chunk + 1, self.max_length // 2)))]
        self.eos, keep = (), self.prefix_entries
        self.prefix_entries = max(1, keep)
        try:
            stream = self.submit(prompt, Params(max_tokens=3, temperature=1.0, top_k=5, top_p=0.9))
            while stream.finish_reason is None:
                self.step()
            reuse = self.submit(prompt + stream.tokens[:-1] + [1], Params(max_tokens=2))
            self.step()
            reuse.cancel()
            while reuse.finish_reason is None:
                self.step()
            self.cache = programs.compact(self.cache, span=self.span)
            self.scratch = programs.reset(self.scratch, np.int32(0))
            for size in {1 << b for b in range(max(self.chunk - 1, 1).bit_length())} - {self.chunk}:
                ids, valid = np.zeros((1, size), np.int32), np.zeros((1, size), bool)  # valid: no-op pieces
                _, self.scratch = prefill_chunk(self.model.params, self.scratch, ids, valid, spec=self.spec)
        finally:
            self.eos, self.prefix_entries = eos, keep
        self.pos = self.span
        self.cache["pos"] = jnp.asarray(self.span, jnp.int32)
        self._snapshots.clear()
        self._counting = True

    # ---- the worker ---------------------------------------------------------------------------------------

    def _on_compile(self, event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT and self._counting and threading.current_thread() is self._thread:
            self.compiles += 1

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._has_work():
                        self._cond.wait()
                    if self._closing:
                        break
                self.step()
        except BaseException as e:  # noqa: BLE001 -- reported to every request, then to submit()
            self.error = e
            for stream in self._all_streams():
                stream.finish_reason = "error"
                stream.emit(Event(None, "", "error"))

    def _all_streams(self) -> list[Stream]:
        out = [a.stream for a in self._active if a is not None] + list(self._waiting)
        return out + ([self._prefill.stream] if self._prefill is not None else [])

    def _has_work(self) -> bool:
        return bool(self._waiting) or self._prefill is not None or any(a is not None for a in self._active)

    def _free_slot(self) -> int | None:
        return next((i for i, a in enumerate(self._active) if a is None and i not in self._reserved), None)

    def step(self) -> None:
        """One scheduling step: drop cancelled requests, run a prefill chunk, then one decode step."""
        self._drop_cancelled()
        with mesh_context(self.model):
            if self._prefill is None:
                self._admit()
            if self._prefill is not None:
                self._prefill_step()
            if any(a is not None for a in self._active):
                self._decode()
        self.steps += 1

    def _drop_cancelled(self) -> None:
        with self._cond:
            for stream in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(stream)
                self._finish_stream(stream, "cancelled", None)
        if self._prefill is not None and self._prefill.stream.cancelled:
            self._reserved.discard(self._prefill.slot)
            self._finish_stream(self._prefill.stream, "cancelled", None)
            self._prefill = None
        for slot, active in enumerate(self._active):
            if active is not None and active.stream.cancelled:
                self._release(slot, "cancelled")

    def _admit(self) -> None:
        with self._cond:
            slot = self._free_slot()
            if slot is None or not self._waiting:
                return
            stream = self._waiting.popleft()
        ids = stream.prompt
        base = max((t for t in self._snapshots if len(t) < len(ids) and tuple(ids[:len(t)]) == t),
                   key=len, default=None)
        rest = np.asarray(ids[len(base):] if base is not None else ids, np.int32)[None]
        if base is not None:
            # Padding is exact only before a sequence's first token (the conv would see its zeros), so the
            # rest of a prompt that continues a snapshot goes in unpadded pieces: whole chunks, then powers of two.
            self._snapshots.move_to_end(base)
            self.scratch = programs.restore(self.scratch, self._snapshots[base])
            stream.reused_tokens = len(base)
            self.reused_tokens += len(base)
            sizes = self._piece_sizes(rest.shape[1])
            starts = np.cumsum([0, *sizes])
            pieces = [(rest[:, a:b], np.ones((1, b - a), bool)) for a, b in zip(starts, starts[1:])]
        else:
            padded = -(-rest.shape[1] // self.chunk) * self.chunk
            self.scratch = programs.reset(self.scratch, np.int32(self.span - padded))
            row_ids = np.zeros((1, padded), np.int32)
            row_valid = np.zeros((1, padded), bool)
            row_ids[:, padded - rest.shape[1]:], row_valid[:, padded - rest.shape[1]:] = rest, True
            pieces = [(row_ids[:, i:i + self.chunk], row_valid[:, i:i + self.chunk])
                      for i in range(0, padded, self.chunk)]
        self._reserved.add(slot)
        self._prefill = _Prefill(stream, slot, pieces)

    def _piece_sizes(self, n: int) -> list[int]:
        """Unpadded piece lengths for ``n`` tokens: whole chunks, then the binary digits of the rest."""
        full, rest = divmod(n, self.chunk)
        return [self.chunk] * full + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]

    def _prefill_step(self) -> None:
        job = self._prefill
        ids, valid = job.pieces.pop(0)
        logits, self.scratch = prefill_chunk(self.model.params, self.scratch, ids, valid, spec=self.spec)
        if job.pieces:
            return
        self._prefill = None
        stream, p = job.stream, job.stream.params
        token, key_data = programs.first_token(logits, np.array([p.seed], np.int32),
                                               np.array([p.temperature], np.float32),
                                               np.array([p.top_k or 0], np.int32),
                                               np.array([p.top_p or 1.0], np.float32))
        self._snapshot(tuple(stream.prompt), self.scratch, 0)
        active = _Active(stream, _Text(self.model.tokenizer, p.stop), list(stream.prompt))
        stream.first_token_at = time.perf_counter()
        if self._accept(active, int(np.asarray(token)[0])):
            self._reserved.discard(job.slot)
            return
        self.cache = programs.insert(self.cache, self.scratch, np.int32(job.slot))
        self._active[job.slot] = active
        self._reserved.discard(job.slot)  # held until now, so the slot counts as busy throughout
        self._tokens[job.slot] = active.stream.tokens[-1]
        self._key_data[job.slot] = np.asarray(key_data)[0]
        self._temperature[job.slot] = p.temperature
        self._top_k[job.slot] = p.top_k or 0
        self._top_p[job.slot] = p.top_p or 1.0

    def _decode(self) -> None:
        self._compact_if_full()
        active = np.array([a is not None for a in self._active])
        tokens, key_data, self.cache = programs.decode_and_sample(
            self.model.params, self.cache, self._tokens, active, self._key_data, self._temperature,
            self._top_k, self._top_p, spec=self.spec)
        self.pos += 1
        tokens, self._key_data = np.asarray(tokens), np.array(key_data)
        for slot, a in enumerate(self._active):
            if a is None:
                continue
            a.fed.append(int(self._tokens[slot]))
            if self._accept(a, int(tokens[slot]), slot):
                continue
            self._tokens[slot] = tokens[slot]

    def _compact_if_full(self) -> None:
        if self.pos >= self.length:
            self.cache = programs.compact(self.cache, span=self.span)
            self.pos -= self.span
            self.compactions += 1

    def _accept(self, active: _Active, token: int, slot: int | None = None) -> bool:
        """Adds a new token to a request; True (and the request finished, its slot freed) when it ends."""
        stream = active.stream
        stream.tokens.append(token)
        text, keep = active.text.update(stream.tokens)
        reason = None
        if keep is not None:
            del stream.tokens[keep:]
            reason = "stop"
        elif token in self.eos:
            reason = "stop"
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
        if active.fed and len(active.fed) > len(active.stream.prompt):
            self._snapshot(tuple(active.fed), self.cache, slot)
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
