"""``jamba serve``'s HTTP API against a live uvicorn server on the demo model, through the official
``openai`` client: concurrent greedy requests equal ``generate`` alone, streams concatenate to the
non-streamed text, chat uses the checkpoint's template, bad fields get 400, a disconnect frees its slot,
prefix reuse is exact, and nothing compiles after warm-up."""

import concurrent.futures
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import jamba_jax
from jamba_jax.demo import DEMO_DIR
from jamba_jax.serve import Engine
from jamba_jax.serve.server import create_app

PROMPTS = ["The for statement", "Lists are", "A class definition defines", "def f(x):\n    return",
           "Exceptions are raised when", "Strings", "x", "The import statement"]
NEW = 20


@pytest.fixture(scope="module")
def model():
    return jamba_jax.load(DEMO_DIR, dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    engine = Engine(model, slots=4, max_length=256, chunk=32, queue_size=16).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(engine, "demo"), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    health = httpx.get(server[1] + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4


def test_concurrent_greedy_completions_equal_generate_alone(server, client, model):
    def ask(prompt):
        return client.completions.create(model="demo", prompt=prompt, max_tokens=NEW, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    for prompt, answer in zip(PROMPTS, answers):
        want = jamba_jax.generate(model, prompt, max_new_tokens=NEW)
        assert answer.choices[0].text == want.text[0], prompt
        assert answer.usage.completion_tokens == len(want.tokens[0])
        assert answer.usage.prompt_tokens == len(model.tokenizer.encode(prompt).ids)
        assert answer.choices[0].finish_reason == ("stop" if len(want.tokens[0]) < NEW else "length")
    assert server[0].compiles == 0


def test_stream_concatenates_to_the_same_text(client):
    whole = client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=NEW, temperature=0)
    chunks = list(client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Lists"}],
                                               max_tokens=NEW, temperature=0, stream=True))
    whole = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Lists"}],
                                           max_tokens=NEW, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chat) == whole.choices[0].message.content


def test_chat_uses_the_checkpoint_template_and_reuses_the_prefix(server, client, model):
    messages = [{"role": "system", "content": "Answer about Python."}, {"role": "user", "content": "Lists"}]
    answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=NEW, temperature=0)
    want = jamba_jax.chat(model, messages, max_new_tokens=NEW)
    assert answer.choices[0].message.content == want.text[0]
    assert answer.usage.prompt_tokens == want.prompt_lengths[0]
    # Second turn: the conversation so far is a snapshot's prefix; the reply equals a fresh run's.
    messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                 {"role": "user", "content": "Strings"}]
    reused = server[0].reused_tokens
    second = client.chat.completions.create(model="demo", messages=messages, max_tokens=NEW, temperature=0)
    assert second.choices[0].message.content == jamba_jax.chat(model, messages, max_new_tokens=NEW).text[0]
    assert server[0].reused_tokens - reused >= want.prompt_lengths[0]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "top_p": 0}, "top_p"), ({"max_tokens": 3}, "prompt"),
    ({"prompt": [5000000]}, None), ({"prompt": "x", "max_tokens": 1000}, None), ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "stop": 3}, "stop")])
def test_bad_fields_get_400_and_the_server_stays_up(server, body, param):
    response = httpx.post(server[1] + "/v1/completions", json={"model": "demo", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"].split(".")[0] == param
    assert httpx.get(server[1] + "/health").json()["status"] == "ok"


def test_bad_json_and_chat_fields(server, client):
    response = httpx.post(server[1] + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="demo", messages=[{"role": "robot", "content": "x"}])
    assert raised.value.body["param"].startswith("messages")


def test_client_disconnect_frees_its_slot(server):
    engine, url = server
    with httpx.stream("POST", url + "/v1/completions",
                      json={"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # decoding has started
        assert engine.busy_slots == 1
    deadline = time.monotonic() + 10
    while engine.busy_slots and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.busy_slots == 0
    assert engine.compiles == 0


@pytest.mark.slow
def test_jamba_serve_command_and_its_compilation_cache(tmp_path, model):
    """``jamba serve`` in a process of its own, started twice on one compilation cache: it answers like
    ``generate`` both times, and the second start compiles nothing (its warm-up reads the cache)."""
    import re
    import subprocess
    import sys

    warm_ups = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "jamba_jax.cli", "serve", "--port", str(port), "--max-batch", "2",
             "--max-length", "64", "--chunk", "16", "--dtype", "float32", "--compilation-cache", str(tmp_path)],
            stderr=subprocess.PIPE, text=True)
        try:
            found = None
            for line in process.stderr:  # JAX may log first
                if found := re.search(r"warm-up ([\d.]+) s", line):
                    break
            assert found, "jamba serve did not start"
            warm_ups.append(float(found.group(1)))
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and process.poll() is None
                    time.sleep(0.2)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            answer = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
            assert answer.choices[0].text == jamba_jax.generate(model, PROMPTS[0], max_new_tokens=NEW).text[0]
            assert httpx.get(f"http://127.0.0.1:{port}/health").json()["compiles_after_warm_up"] == 0
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert any(tmp_path.iterdir())
    assert warm_ups[1] < warm_ups[0] / 2, warm_ups
