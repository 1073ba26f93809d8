"""The continuous-batching engine: each request's tokens equal ``jamba_jax.generate`` of that prompt alone,
however requests overlap; no compile after warm-up; cancellation frees the slot; prefix reuse is exact."""

import numpy as np
import pytest

import jamba_jax
from jamba_jax.demo import DEMO_DIR
from jamba_jax.serve import Engine, Params, QueueFull

PROMPTS = ["The for statement", "Lists are", "A class definition defines", "def f(x):\n    return",
           "Exceptions are raised when", "The import statement", "Strings", "x",
           "The while statement is used for repeated execution as long as an expression is true"]
NEW = 24  # one max_new_tokens for every reference run: generate compiles its decode loop per value


@pytest.fixture(scope="module")
def model():
    return jamba_jax.load(DEMO_DIR, dtype="float32")


@pytest.fixture(scope="module")
def engine(model):
    # 3 slots for 9 requests: slots are reused; 16-token chunks: several chunks per prompt; rows of at most
    # 48 tokens in a 96-position cache: the cache is compacted every 48 steps.
    engine = Engine(model, slots=3, max_length=48, chunk=16, queue_size=16, prefix_entries=4).start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def references(model):
    return {p: jamba_jax.generate(model, p, max_new_tokens=NEW).tokens[0] for p in PROMPTS}


def test_concurrent_greedy_requests_equal_generate_alone(engine, references):
    streams = [engine.submit(p, max_tokens=NEW) for p in PROMPTS]
    for p, stream in zip(PROMPTS, streams):
        stream.result()
        assert stream.tokens == references[p], p
        assert stream.finish_reason == ("stop" if references[p][-1] in engine.eos else "length")
    assert engine.compactions >= 1
    assert engine.compiles == 0
    assert engine.busy_slots == 0
    # 9 requests at once on 3 slots: prompts were prefilled together, and calls of several decode steps ran
    # while every slot was busy.
    assert max(engine.prefill_groups) == 3
    assert set(engine.decode_calls) == {1, engine.decode_steps}


def test_events_carry_the_text(engine, model):
    stream = engine.submit(PROMPTS[0], max_tokens=NEW)
    events = list(stream)
    assert [e.token for e in events[:-1]] == stream.tokens
    assert "".join(e.text for e in events) == stream.text == model.tokenizer.decode(stream.tokens)
    assert events[-1].finish_reason is not None and events[-1].token is None


def test_sampled_request_equals_generate_with_its_seed(engine, model):
    settings = dict(temperature=0.9, top_k=40, top_p=0.9, seed=7)
    want = jamba_jax.generate(model, PROMPTS[1], max_new_tokens=NEW, **settings).tokens[0]
    others = [engine.submit(p, max_tokens=NEW, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS[3:6])]
    stream = engine.submit(PROMPTS[1], max_tokens=NEW, **settings).result()
    assert stream.tokens == want
    for s in others:
        s.result()
    assert engine.compiles == 0


def test_stop_string_cuts_text_as_generate_does(engine, model):
    full = jamba_jax.generate(model, PROMPTS[0], max_new_tokens=NEW)
    stop = full.text[0][5:9]
    want = jamba_jax.generate(model, PROMPTS[0], max_new_tokens=NEW, stop=[stop])
    events = list(stream := engine.submit(PROMPTS[0], max_tokens=NEW, stop=(stop,)))
    assert stream.finish_reason == "stop"
    assert stream.tokens == want.tokens[0] and stream.text == want.text[0]
    assert "".join(e.text for e in events) == want.text[0] and stop not in stream.text


def test_cancel_frees_the_slot(engine, references):
    long = [engine.submit(p, max_tokens=40) for p in PROMPTS[:3]]
    for stream in long:
        next(iter(stream))  # decoding
    long[1].cancel()
    assert long[1].result().finish_reason == "cancelled"
    late = engine.submit(PROMPTS[4], max_tokens=NEW).result()  # takes the freed slot
    assert late.tokens == references[PROMPTS[4]]
    for stream in long:
        stream.cancel()
        stream.result()
    assert engine.busy_slots == 0 and engine.compiles == 0


def test_cancelling_one_prompt_of_a_group(engine, model, references):
    """A request cancelled while its prompt is prefilled with others: the others' tokens are unchanged, its
    slot is free. Driven step by step (a second engine of the fixture's shapes: nothing compiles)."""
    manual = Engine(model, slots=3, max_length=48, chunk=16, queue_size=16, prefix_entries=4)
    long = manual.encode(PROMPTS[8]) + manual.encode(PROMPTS[0])  # over one chunk: the group runs two
    streams = [manual.submit(p, max_tokens=NEW) for p in (PROMPTS[1], long, PROMPTS[2])]
    manual.step()  # the group's first chunk
    assert dict(manual.prefill_groups) == {3: 1} and manual.busy_slots == 3
    streams[1].cancel()
    while any(s.finish_reason is None for s in streams):
        manual.step()
    assert streams[1].finish_reason == "cancelled" and streams[1].tokens == []
    assert streams[0].tokens == references[PROMPTS[1]] and streams[2].tokens == references[PROMPTS[2]]
    assert manual.busy_slots == 0
    manual.close()


def test_decode_steps_equal_single_steps(engine, model):
    """One call of several decode steps equals that many calls of one: tokens and cache, a row stopping at
    its budget and a row whose token is EOS left untouched."""
    import jax
    import jax.numpy as jnp

    from jamba_jax.cache import KV_CACHE, cache_entry, cache_logical_axes
    from jamba_jax.serve import slots as programs
    from jamba_jax.steps import ModelSpec, init_cache

    spec, steps, rows = ModelSpec.of(model), engine.decode_steps, engine.slots
    eos = engine.eos[0]

    def fresh_cache():
        cache = init_cache(model, rows, engine.length)
        cache["pos"] = jnp.asarray(engine.span, jnp.int32)
        return cache

    def call(cache, tokens, budget, n, fresh):
        zeros_f, zeros_i = np.zeros(rows, np.float32), np.zeros(rows, np.int32)
        keys = np.zeros((rows, 2), np.uint32)
        return programs.decode_steps(model.params, cache, tokens, keys, np.full(rows, fresh), tokens, keys,
                                     budget, zeros_f, zeros_i, np.ones(rows, np.float32), spec=spec, steps=n,
                                     eos=engine.eos)

    start = np.array([17, 42, eos][:rows], np.int32)
    budget = np.array([steps, 2, steps][:rows], np.int32)
    new, _, _, many = call(fresh_cache(), start, budget, steps, True)
    cache, tokens, singles = fresh_cache(), start, []
    for j in range(steps):
        out, tokens, _, cache = call(cache, tokens, (budget > j).astype(np.int32), 1, j == 0)
        singles.append(np.asarray(out)[0])
    new, singles = np.asarray(new), np.stack(singles)
    np.testing.assert_array_equal(new[:, 0], singles[:, 0])
    np.testing.assert_array_equal(new[:2, 1], singles[:2, 1])
    for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(cache)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6)
    for (path, leaf), empty in zip(jax.tree_util.tree_leaves_with_path(many), jax.tree.leaves(fresh_cache())):
        axes = cache_logical_axes(path, leaf.ndim)
        # The EOS row's state as it was: no valid slot, the same Mamba state (K/V are written at every
        # step, valid or not, and read only where valid).
        if "batch" in axes and cache_entry(path).kind != KV_CACHE:
            row = axes.index("batch")
            np.testing.assert_array_equal(np.take(np.asarray(leaf), 2, axis=row), np.take(np.asarray(empty), 2, axis=row))


def test_prefix_reuse_is_exact(engine, model):
    first = engine.submit(PROMPTS[8], max_tokens=12).result()
    ids = engine.encode(PROMPTS[8]) + first.tokens[:-1] + engine.encode(" The")
    second = engine.submit(ids, max_tokens=12).result()
    assert second.reused_tokens == len(ids) - len(engine.encode(" The"))
    assert second.tokens == jamba_jax.generate(model, [ids], max_new_tokens=12).tokens[0]
    # The same prompt again reuses the snapshot taken after the prompt alone.
    third = engine.submit(ids + [5], max_tokens=12).result()
    assert third.reused_tokens == len(ids)
    assert third.tokens == jamba_jax.generate(model, [ids + [5]], max_new_tokens=12).tokens[0]
    assert engine.compiles == 0


def test_bad_requests_and_a_full_queue(model):
    engine = Engine(model, slots=1, max_length=32, chunk=16, queue_size=1)  # not started: nothing is served
    with pytest.raises(ValueError, match="max length of 32"):
        engine.submit("x " * 40, max_tokens=4)
    for bad, match in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"), (dict(seed=-1), "seed"),
                       (dict(stop=("",)), "stop")]:
        with pytest.raises(ValueError, match=match):
            Params(**bad)
    with pytest.raises(ValueError, match="token id"):
        engine.submit([model.config.vocab_size], max_tokens=2)
    engine.submit("a", max_tokens=2)
    engine.submit("b", max_tokens=2)  # the free slot is not taken until the engine steps
    with pytest.raises(QueueFull):
        engine.submit("c", max_tokens=2)
    engine.close()


def test_streamed_text_equals_the_whole_decode(model):
    """A request's text built token by token (with stop strings and held-back partial characters) equals
    the tokenizer's decode of all its tokens, cut before the first stop string."""
    from jamba_jax.serve.engine import _Text

    tok, rng = model.tokenizer, np.random.default_rng(0)
    words = tok.encode("Wörter — ünïcödé 日本語 text\n  with  spaces, 🙂 and tabs\t" * 3).ids
    for trial in range(40):
        n = int(rng.integers(2, 60))
        ids = words[:n] if trial % 2 else rng.integers(0, tok.get_vocab_size(), n).tolist()
        full = tok.decode(ids)
        start = int(rng.integers(0, max(1, len(full) - 3)))
        stop = () if trial % 3 == 0 or len(full) < 4 else (full[start:start + int(rng.integers(1, 4))],)
        text, out, keep = _Text(tok, stop), "", None
        for i in range(1, len(ids) + 1):
            new, keep = text.update(ids[:i])
            out += new
            if keep is not None:
                break
        if keep is None:
            out += text.final(ids)
            assert not stop or stop[0] not in full.rstrip("\ufffd"), (trial, stop)
            assert out == full.rstrip("\ufffd") or out == full, trial
        else:
            assert out == full[:full.find(stop[0])], trial
            assert stop[0] not in tok.decode(ids[:keep]) and stop[0] in tok.decode(ids[:keep + 1]), trial


def test_per_row_sampler_matches_sampling_sample():
    import jax

    from jamba_jax.sampling import sample
    from jamba_jax.serve.slots import sample_rows

    logits = jax.random.normal(jax.random.key(0), (4, 64)) * 3
    settings = [(0.0, None, None), (0.7, None, None), (1.3, 5, None), (0.9, 10, 0.8)]
    keys = jax.random.split(jax.random.key(1), 4)
    got = sample_rows(logits, keys, np.array([s[0] for s in settings], np.float32),
                      np.array([s[1] or 0 for s in settings], np.int32),
                      np.array([s[2] or 1.0 for s in settings], np.float32))
    for row, (t, k, p) in enumerate(settings):
        want = sample(logits[row:row + 1], keys[row], temperature=t, top_k=k, top_p=p)[0]
        assert int(got[row]) == int(want)


MESH_CHECK = """
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import jamba_jax
from jamba_jax.demo import DEMO_DIR
from jamba_jax.serve import Engine
prompts = ["The for statement", "Lists are", "x"]
alone = jamba_jax.load(DEMO_DIR, dtype="float32")
want = [jamba_jax.generate(alone, p, max_new_tokens=10).tokens[0] for p in prompts]
model = jamba_jax.load(DEMO_DIR, dtype="float32", mesh=jamba_jax.make_mesh(2))
engine = Engine(model, slots=2, max_length=64, chunk=16).start()
got = [s.result().tokens for s in [engine.submit(p, max_tokens=10) for p in prompts]]
key = engine.cache["blocks"]["layer_4"]["key"]
print(json.dumps({"equal": got == want, "compiles": engine.compiles,
                  "key_spec": list(key.sharding.spec), "devices": len(key.sharding.device_set)}))
engine.close()
"""


@pytest.mark.slow
def test_engine_on_a_two_device_mesh_equals_one_device():
    """Under a 2-way tensor mesh (fake CPU devices, in a process of its own) the slot cache is sharded by
    kv heads and the engine's greedy tokens equal one-device ``generate``'s, with no compile after warm-up."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MESH_CHECK], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"equal": True, "compiles": 0, "key_spec": [None, None, "tensor"], "devices": 2}
