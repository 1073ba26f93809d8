"""Inference: chunked prefill into the hybrid cache, then an on-device decode loop.

``generate`` left-pads a batch of prompts to a bucketed length (padding is exact: masked positions
are inert in attention, the conv and the scan), prefills it chunk by chunk so activation memory does
not grow with the prompt, and decodes in a ``lax.while_loop`` until every row has stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .api import Jamba, mesh_context
from .attention import KEY_BLOCK
from .distributed import to_host
from .sampling import sample
from .steps import (ModelSpec, apply_step, available_bytes, cache_device_bytes, decode_step, default_chunk,
                    init_cache, model_platform, prefill, prefill_pieces)

MIN_BUCKET = 16


@dataclasses.dataclass
class GenerationResult:
    """New tokens per prompt (EOS included when generated; nothing after it), their text when the model
    has a tokenizer, and timings: ``compile_seconds`` is the time JAX spent tracing and compiling during
    the call (the first call at a new shape), which ``prefill_seconds`` and ``decode_seconds`` leave out.
    ``decode_tokens_per_second`` counts tokens of all rows."""

    tokens: list[list[int]]
    text: list[str] | None
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(t) for t in self.tokens) - 1 if self.tokens else 0
        return len(self.tokens) * steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return sum(self.prompt_lengths) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (static: part of the compiled decode loop): greedy at
    ``temperature == 0``, else sampled with optional top-k / top-p (``sampling.sample``)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # NaN fails too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits, key):
        """Token ids ``[batch]`` int32 from logits ``[batch, vocab]``."""
        return sample(logits, key, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@functools.partial(jax.jit, static_argnames="sampling")
def _sample(logits, key, *, sampling: Sampling):
    return sampling(logits, key)


class _CompileClock:
    """Adds up the seconds JAX reports spending on tracing, lowering and compiling (top-level ``jit``
    calls, any thread) while entered; ``seconds`` keeps growing over several entries."""

    EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                        "/jax/core/compile/jaxpr_to_mlir_module_duration",
                        "/jax/core/compile/backend_compile_duration"})

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_):
        if event in self.EVENTS:
            self.seconds += duration

    # A JAX without these hooks leaves ``seconds`` at 0 (prefill and decode times then include compiling).
    def __enter__(self):
        register = getattr(jax.monitoring, "register_event_duration_secs_listener", None)
        self._registered = register is not None and hasattr(jax.monitoring, "unregister_event_duration_listener")
        if self._registered:
            register(self._listen)
        return self

    def __exit__(self, *exc):
        if self._registered:
            jax.monitoring.unregister_event_duration_listener(self._listen)


def _pow2_bucket(n: int, chunk: int) -> int:
    return min(chunk, max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()))


def bucket_length(n: int, chunk: int | None = None) -> int:
    """Padded prompt length: whole chunks for all but the last ``n % chunk`` tokens, which get the next
    power of two (at least 16). Prefill pieces then come from a fixed small set of shapes, so a new prompt
    length rarely means a new compile, and padding stays below half the last piece. ``chunk``: default
    ``steps.default_chunk()`` (256 on CPU)."""
    chunk = default_chunk() if chunk is None else chunk
    full, rest = divmod(n, chunk)
    return full * chunk + (_pow2_bucket(rest, chunk) if rest or not full else 0)


def prefill_layout(prompt_len: int, max_new_tokens: int, chunk: int | None = None):
    """What ``generate`` runs for a batch whose longest prompt has ``prompt_len`` tokens: the padded length
    (``bucket_length``), the cache length (room for the new tokens, rounded up to whole key blocks of the
    attention, so it rarely changes and attention never pads, i.e. copies, K/V) and the lengths of the
    prefill pieces in order (``steps.prefill_pieces``). ``chunk``: default ``steps.default_chunk()``."""
    chunk = default_chunk() if chunk is None else chunk
    length = bucket_length(prompt_len, chunk)
    max_len = -(-(length + max_new_tokens) // KEY_BLOCK) * KEY_BLOCK
    return length, max_len, prefill_pieces(length, chunk)


@functools.partial(jax.jit, static_argnames=("spec", "sampling", "max_new_tokens"))
def _decode_loop(params, cache, first, key, eos, pad_id, *, spec: ModelSpec, sampling: Sampling,
                 max_new_tokens: int):
    """Decodes on device until every row has produced an EOS or ``max_new_tokens`` tokens.
    Returns tokens ``[batch, max_new_tokens]`` (``pad_id`` after a row stops) and the step count."""
    batch = first.shape[0]
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, token, done, out, key = state
        key, sub = jax.random.split(key)
        logits, cache = apply_step(params, cache, token[:, None], None, spec=spec)
        nxt = jnp.where(done, pad_id, sampling(logits, sub))
        out = out.at[:, step].set(nxt)
        return step + 1, cache, nxt, done | jnp.isin(nxt, eos), out, key

    step, _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, first, done, out, key))
    return out, step


def encode_prompts(model: Jamba, prompts) -> list[list[int]]:
    """A string, a list of strings (needs the tokenizer), a list of token ids, or a list of such lists."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) and all(isinstance(t, (int, np.integer)) for t in prompts):
        prompts = [list(prompts)]
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("prompts are text but the model has no tokenizer (tokenizer.json); "
                                 "pass token ids instead")
            p = model.tokenizer.encode(p).ids
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in p):
            bad = next(t for t in p if not isinstance(t, (int, np.integer)) or isinstance(t, bool))
            raise ValueError(f"prompt {i} has token id {bad!r}, not an integer")
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {model.config.vocab_size})")
        encoded.append(p)
    if not encoded:
        raise ValueError("no prompts given")
    return encoded


def stop_token_ids(model: Jamba) -> tuple[int, ...]:
    """EOS ids from the checkpoint's ``generation_config.json`` when it has one, else from the config."""
    if model.checkpoint_dir is not None:
        file = Path(model.checkpoint_dir) / "generation_config.json"
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
    return model.config.eos_token_ids


def _left_pad(prompts: list[list[int]], length: int, pad_id: int):
    ids = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = p
        valid[row, length - len(p):] = True
    return ids, valid


def _check_fits(model: Jamba, batch: int, prompt_len: int, max_new_tokens: int, chunk: int) -> None:
    """Refuses, before anything is allocated, a generation whose cache (and token buffer) would not fit the
    devices' free memory, naming the largest ``max_new_tokens`` that would."""
    def need(new: int) -> int:
        return cache_device_bytes(model, batch, prefill_layout(prompt_len, new, chunk)[1]) + 4 * batch * new

    free = available_bytes(model)
    if free is None or need(max_new_tokens) <= free:
        return
    low, high = 0, max_new_tokens  # need() grows with new: the largest that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if need(mid) <= free else (low, mid - 1)
    hint = f"the largest max_new_tokens whose cache fits is {low:,}" if low else "not even one new token fits"
    raise ValueError(f"max_new_tokens={max_new_tokens:,} for {batch} prompt(s) of up to {prompt_len:,} tokens needs "
                     f"{need(max_new_tokens) / 2**30:,.2f} GiB a device, {free / 2**30:,.2f} GiB free; {hint}")


def _prefill(model: Jamba, sampling: Sampling, prompts, max_new_tokens: int, chunk: int, key):
    """The prompts left-padded to their bucket and prefilled into a new cache: (first new token
    ``[batch]``, cache, the key left for decoding)."""
    length, max_len, _ = prefill_layout(max(map(len, prompts)), max_new_tokens, chunk)
    ids, valid = _left_pad(prompts, length, model.config.pad_token_id or 0)
    cache = init_cache(model, len(prompts), max_len)
    logits, cache = prefill(model, ids, cache, valid, chunk_size=chunk)
    key, sub = jax.random.split(key)
    return _sample(logits, sub, sampling=sampling), cache, key


def _truncate(tokens: Sequence[int], eos: tuple[int, ...]) -> list[int]:
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos:
            break
    return out


def _cut_at_stop(tokenizer, tokens: list[int], stop: Sequence[str]) -> tuple[list[int], str]:
    """The longest prefix of ``tokens`` whose text holds no stop string, and the text cut before the
    first stop string."""
    text = tokenizer.decode(tokens)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    if cut < 0:
        return tokens, text
    n = len(tokens)
    while n and any(s in tokenizer.decode(tokens[:n]) for s in stop):
        n -= 1
    return tokens[:n], text[:cut]


def chat(model: Jamba, messages: Sequence[dict], **kwargs):
    """``generate`` for one conversation: renders ``messages`` with the checkpoint's chat template
    (``Jamba.checkpoint_dir``'s tokenizer_config.json; the Jamba-1.5 format otherwise)."""
    from .chat_template import load_chat_template, render_chat

    if model.tokenizer is None:
        raise ValueError("chat needs the model's tokenizer (tokenizer.json)")
    template, special = load_chat_template(model.checkpoint_dir)
    text = render_chat(messages, template, special)
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    return generate(model, [ids], **kwargs)


def generate(model: Jamba, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop: Sequence[str] | None = None, stop_ids: Sequence[int] | None = None,
             chunk_size: int | None = None, stream: bool = False):
    """Generates up to ``max_new_tokens`` tokens for each prompt.

    ``prompts``: a string, a list of strings (needs the model's tokenizer), or a list of token-id lists
    of any lengths (run together, left-padded). Greedy when ``temperature == 0``; otherwise sampled
    with optional top-k / top-p, reproducibly for a given ``seed``. A row stops at an EOS id
    (``stop_ids``, default the config's) or, with a tokenizer, before the first of the ``stop`` strings.

    ``chunk_size``: prefill tokens per compiled step, default ``steps.default_chunk`` of the model's
    platform (256 on CPU, ``steps.GPU_CHUNK`` on GPU); the padded prompt is whole chunks plus a
    power-of-two piece (``bucket_length``).

    Returns a ``GenerationResult``; with ``stream=True``, an iterator of ``[batch]`` lists of new token
    ids (``None`` for rows that have stopped), one per step, whose ``StopIteration`` value is the result.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if chunk_size is None:
        chunk_size = default_chunk(model_platform(model))
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if stop and model.tokenizer is None:
        raise ValueError("stop strings need the model's tokenizer; use stop_ids")
    encoded = encode_prompts(model, prompts)
    sampling = Sampling(float(temperature), top_k, top_p)
    _check_fits(model, len(encoded), max(map(len, encoded)), max_new_tokens, chunk_size)
    eos = tuple(stop_ids) if stop_ids is not None else stop_token_ids(model)
    runner = _stream(model, sampling, encoded, max_new_tokens, seed, eos, stop, chunk_size)
    if stream:
        return runner
    return _run(model, sampling, encoded, max_new_tokens, seed, eos, stop, chunk_size)


def _run(model, sampling, encoded, max_new_tokens, seed, eos, stop, chunk_size) -> GenerationResult:
    t0 = time.perf_counter()
    with mesh_context(model), _CompileClock() as clock:
        first, cache, key = _prefill(model, sampling, encoded, max_new_tokens, chunk_size, jax.random.key(seed))
        first.block_until_ready()
        t1, prefill_compile = time.perf_counter(), clock.seconds
        pad_id = model.config.pad_token_id or 0
        out, _ = _decode_loop(model.params, cache, first, key, jnp.asarray(eos or (-1,), jnp.int32),
                              jnp.int32(pad_id), spec=ModelSpec.of(model), sampling=sampling,
                              max_new_tokens=max_new_tokens)
        out = to_host(out)
    t2 = time.perf_counter()
    return _finish(model, out, encoded, eos, stop, t1 - t0 - prefill_compile,
                   t2 - t1 - (clock.seconds - prefill_compile), clock.seconds)


def _finish(model, out, encoded, eos, stop, prefill_s, decode_s, compile_s) -> GenerationResult:
    tokens = [_truncate(row, eos) for row in np.asarray(out)]
    text = None
    if model.tokenizer is not None:
        cut = [_cut_at_stop(model.tokenizer, t, stop or ()) for t in tokens]
        tokens, text = [c[0] for c in cut], [c[1] for c in cut]
    return GenerationResult(tokens, text, [len(p) for p in encoded], prefill_s, decode_s, compile_s)


def _stream(model, sampling, encoded, max_new_tokens, seed, eos, stop, chunk_size) -> Iterator[list]:
    clock = _CompileClock()  # entered around this code only: the caller's runs between yields
    t0 = time.perf_counter()
    with clock:
        token, cache, key = _prefill(model, sampling, encoded, max_new_tokens, chunk_size, jax.random.key(seed))
        token = to_host(token)
    t1, prefill_compile = time.perf_counter(), clock.seconds
    batch = len(encoded)
    rows = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        if step:
            key, sub = jax.random.split(key)
            with clock:
                logits, cache = decode_step(model, token, cache)
                token = to_host(_sample(logits, sub, sampling=sampling))
        emitted = []
        for row in range(batch):
            if done[row]:
                emitted.append(None)
                continue
            rows[row].append(int(token[row]))
            emitted.append(int(token[row]))
            done[row] = token[row] in eos or (bool(stop) and any(
                s in model.tokenizer.decode(rows[row]) for s in stop))
        yield emitted
        if done.all():
            break
    pad_id = model.config.pad_token_id or 0
    width = max(map(len, rows))
    out = np.array([r + [pad_id] * (width - len(r)) for r in rows])
    decode_compile = clock.seconds - prefill_compile
    return _finish(model, out, encoded, eos, stop, t1 - t0 - prefill_compile,
                   time.perf_counter() - t1 - decode_compile, clock.seconds)
