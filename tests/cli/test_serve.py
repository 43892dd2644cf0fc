"""``squeezekv serve`` end to end: a real server on a free port, called with the official openai client."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

import squeezekv
from squeezekv.cli import build_parser, main
from squeezekv.cli.serve import build_server, parse_bytes
from squeezekv.serving.app import create_app

PROMPTS = [
    "The river runs through the old town",
    "In the winter of that year the council",
    "Scientists have long studied how",
    "The first railway in the region was",
    "Her early work on the history of",
    "During the war the harbour",
]
CLIENTS = 16  # concurrent clients, each with its own prompt


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """The server ``squeezekv serve --budget 0.3 --policy h2o ...`` builds, run by uvicorn in a thread."""
    args = build_parser().parse_args(
        ["serve", "--budget", "0.3", "--device", "cpu", "--kv-memory", "32MiB", "--max-queue", "16"]
    )
    server = build_server(args)
    port = free_port()
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    while not uvicorn_server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    yield server, client, base
    uvicorn_server.should_exit = True
    thread.join()


def alone(server, prompt: str, max_tokens: int) -> str:
    model, tokenizer = server.engine.model, server.tokenizer
    ids = torch.tensor([tokenizer(prompt).input_ids])
    result = squeezekv.generate(model, ids, server.engine.config, max_new_tokens=max_tokens, do_sample=False)
    tokens = result.sequences[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    return tokenizer.decode(
        tokens[: tokens.index(eos)] if eos in tokens else tokens, skip_special_tokens=True
    )


def health(base: str) -> dict:
    return httpx.get(f"{base}/health").json()


def test_concurrent_clients_get_what_each_request_gets_alone(served):
    server, client, base = served
    assert [model.id for model in client.models.list()] == ["squeeze-ref-25m"]

    def complete(prompt):
        return client.completions.create(model="squeeze-ref-25m", prompt=prompt, max_tokens=5)

    prompts = [f"{PROMPTS[index % len(PROMPTS)]} {index}" for index in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(complete, prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer.choices[0].text == alone(server, prompt, 5)
        assert answer.usage.completion_tokens <= 5 and answer.choices[0].finish_reason in ("length", "stop")
    assert health(base)["kv_bytes_in_use"] == 0


def test_streaming_completion_and_chat_equal_their_whole_answers(served):
    _, client, _ = served
    whole = client.completions.create(model="squeeze-ref-25m", prompt=PROMPTS[0], max_tokens=12)
    chunks = list(
        client.completions.create(model="squeeze-ref-25m", prompt=PROMPTS[0], max_tokens=12, stream=True)
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    messages = [{"role": "user", "content": "Tell me about the harbour."}]
    chat = client.chat.completions.create(model="squeeze-ref-25m", messages=messages, max_tokens=10)
    stream = client.chat.completions.create(
        model="squeeze-ref-25m",
        messages=messages,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert (
        "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        == chat.choices[0].message.content
    )
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"temperature": 0.7}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"extra_body": {"budget": 2.5}}, "budget"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
        ({"stop": ["\n"]}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"extra_body": {"allocator": "squeeze-bits"}}, "allocator"),  # quantizes: the simple path only
    ],
)
def test_bad_requests_get_a_400_naming_the_field(served, settings, field):
    _, client, _ = served
    request = {"model": "squeeze-ref-25m", "prompt": "hello", "max_tokens": 4, **settings}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**request)
    assert caught.value.body["param"] == field and caught.value.body["type"] == "invalid_request_error"


def test_unknown_model_and_malformed_messages(served):
    _, client, _ = served
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.completions.create(model="gpt-4", prompt="hello", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="squeeze-ref-25m", messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.body["param"] == "messages[0]"


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(served):
    server, client, base = served
    server.close()  # the engine pauses: requests wait in its queue, here of 2
    server.engine.max_waiting = 2
    body = {"model": "squeeze-ref-25m", "prompt": PROMPTS[1], "max_tokens": 4}
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(client.completions.create, **body) for _ in range(2)]
        while len(server.engine.waiting) < 2:
            time.sleep(0.02)
        refused = httpx.post(f"{base}/v1/completions", json=body)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "server_busy"
        server.stop.clear()
        server.start()
        server.engine.max_waiting = 16
        texts = [future.result(timeout=60).choices[0].text for future in waiting]
    assert texts[0] == texts[1] == alone(server, PROMPTS[1], 4)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_memory(served, stream):
    server, _, base = served
    cancelled = server.engine.finished["cancelled"]
    body = {"model": "squeeze-ref-25m", "prompt": PROMPTS[2], "max_tokens": 3000, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{base}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"
            assert health(base)["running"] == 1 and health(base)["kv_bytes_in_use"] > 0
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{base}/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 30
    while server.engine.finished["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    state = health(base)
    assert state["finished"]["cancelled"] == cancelled + 1
    assert state["running"] == 0 and state["kv_bytes_in_use"] == 0


def test_sizes_and_a_missing_extra_are_explained(monkeypatch, capsys):
    assert (
        parse_bytes("256MiB") == 256 * 2**20
        and parse_bytes("2G") == 2 * 2**30
        and parse_bytes("1000") == 1000
    )
    import builtins

    real_import = builtins.__import__

    def without_fastapi(name, *args, **kwargs):
        if name == "fastapi" or name.startswith("fastapi."):
            raise ImportError("No module named 'fastapi'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_fastapi)
    monkeypatch.delitem(__import__("sys").modules, "squeezekv.serving.app")
    assert main(["serve", "--budget", "0.2", "--device", "cpu"]) == 2
    assert "pip install 'squeezekv[serve]'" in capsys.readouterr().err
