"""`pbkd serve`'s server in-process on a tiny Llama: the key, the limits, bad requests, stalled and departed
clients, the chat template under transformers 5, the response's fields, and how the client reports errors."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from pbkd_cli.config.schema import ModelConfig, TinyLlamaConfig
from pbkd_cli.generation import server as srv
from pbkd_cli.generation.hf import Samples, generate
from pbkd_cli.generation.openai_api import ChatEndpoint
from pbkd_cli.io import PbkdError
from pbkd_cli.models.factory import build_bpe_tokenizer, load_causal_lm

CHAT = [{"role": "user", "content": "Tom has 3 apples. He buys 2 apples. How many apples does he have?"}]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
KEY = "serve-secret-key"
CAP, MAX_BODY = 64, 8192


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = build_bpe_tokenizer([m["content"] for m in CHAT] * 20, vocab_size=300)
    arch = TinyLlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64)
    return load_causal_lm(ModelConfig(tiny=arch), tokenizer, "model.teacher").eval(), tokenizer


@contextlib.contextmanager
def serving(chat: srv.ChatModel, **kwargs):
    server = srv.make_server(chat, "127.0.0.1", 0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def chat(tiny):
    return srv.ChatModel(*tiny, name="tiny", max_tokens=CAP)


@pytest.fixture(scope="module")
def port(chat):
    with serving(chat, max_body=MAX_BODY, timeout_s=1.0) as port:
        yield port


def post(port: int, body, headers: dict | None = None, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def raw(port: int, data: bytes, close_after_send: bool = False) -> tuple[int | None, dict | None]:
    """Send `data` as is; (status, JSON body) of the reply, (None, None) when the server just closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    if not reply:
        return None, None
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def request_bytes(body: dict, extra: bytes = b"") -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(data), extra)) + data


def test_a_chat_template_gives_token_ids_under_transformers_5(tiny):
    """With tokenize=True transformers 5 returns a BatchEncoding: every templated chat was a 400."""
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = TEMPLATE
    chat = srv.ChatModel(model, tokenizer, name="tiny", max_tokens=CAP)
    ids = chat.prompt_ids(CHAT)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == tokenizer(f"<user>{CHAT[0]['content']}</s><assistant>", add_special_tokens=False)["input_ids"]
    with serving(chat) as port:
        status, reply = post(port, {"messages": CHAT, "max_tokens": 4})
    assert status == 200 and reply["usage"]["prompt_tokens"] == len(ids)


def test_a_template_that_refuses_the_messages_is_a_400(tiny):
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with serving(srv.ChatModel(model, tokenizer, name="tiny")) as port:
        status, reply = post(port, {"messages": CHAT})
    assert status == 400 and "roles must alternate" in reply["error"]["message"]


def test_a_set_key_is_required_and_never_echoed(chat, monkeypatch):
    with serving(chat, api_key=KEY) as port:
        body = {"messages": CHAT, "max_tokens": 2}
        replies = [post(port, body), post(port, body, {"Authorization": "Bearer wrong"}),
                   post(port, body, {"Authorization": KEY})]
        assert [status for status, _ in replies] == [401, 401, 401]
        assert all("API key" in reply["error"]["message"] and KEY not in json.dumps(reply) for _, reply in replies)
        assert post(port, body, {"Authorization": f"Bearer {KEY}"})[0] == 200
        models = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models")
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(models, timeout=10)
        models.add_header("Authorization", f"Bearer {KEY}")
        with urllib.request.urlopen(models, timeout=10) as response:
            assert json.loads(response.read())["data"][0]["id"] == "tiny"

        # The client sends the key from its api_key_env; a wrong one is the server's message, in one line.
        monkeypatch.setenv("PBKD_TEST_SERVE_KEY", KEY)
        endpoint = ChatEndpoint(base_url=f"http://127.0.0.1:{port}/v1", model="tiny", max_retries=0,
                                api_key_env="PBKD_TEST_SERVE_KEY")
        assert len(endpoint.complete(CHAT, max_tokens=2, n=2, temperature=1.0)) == 2
        monkeypatch.setenv("PBKD_TEST_SERVE_KEY", "not-the-key")
        with pytest.raises(PbkdError, match=r"\(HTTP 401: missing or wrong API key"):
            endpoint.complete(CHAT, max_tokens=2)


@pytest.mark.parametrize("body, message", [
    (b"[1, 2]", "the body must be a JSON object, not an array"),
    (b"not json", "the body is not JSON"),
    (b"[" * 3000 + b"]" * 3000, "the body is not JSON"),  # too deep for the parser (a RecursionError)
    ({"messages": CHAT, "n": 0}, "n=0: must be between 1 and 16"),
    ({"messages": CHAT, "n": 17}, "n=17: must be between 1 and 16"),
    ({"messages": CHAT, "n": True}, "n must be an integer, got true"),
    ({"messages": CHAT, "max_tokens": "10"}, 'max_tokens must be an integer, got "10"'),
    ({"messages": CHAT, "max_tokens": 1.5}, "max_tokens must be an integer, got 1.5"),
    ({"messages": CHAT, "max_tokens": 10**6}, f"max_tokens=1000000: must be between 1 and {CAP} (this server's cap"),
    ({"messages": CHAT, "stream": True}, "stream is not supported"),
    ({"model": "tiny"}, "messages must be a non-empty array"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object with a string role and a string content"),
    ({"messages": [{"role": "user", "content": ""}]}, "the messages make an empty prompt"),
    ({"messages": CHAT, "temperature": -1}, "temperature must be a number >= 0, got -1"),
    ({"messages": CHAT, "top_p": 0}, "top_p must be a number in (0, 1], got 0"),
])
def test_a_bad_body_is_a_400_with_a_json_message(port, body, message):
    status, reply = post(port, body)
    assert status == 400 and reply["error"]["message"].startswith(message), reply


@pytest.mark.parametrize("head, status, message", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411, "a Content-Length header is required"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "a Content-Length"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length must be a non-neg"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length must be a non-neg"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400, "Content-Length must be a non-neg"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"x" * (MAX_BODY + 1),
     413, f"the body has {MAX_BODY + 1} bytes, more than this server takes ({MAX_BODY}"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n", 413, "the body has"),
    (b"POST /v1/other HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404, "no route /v1/other"),
    (b"PUT /v1/chat/completions HTTP/1.1\r\n\r\n", 501, "Unsupported method"),
])
def test_a_bad_request_head_gets_an_answer_not_a_hang(port, head, status, message):
    start = time.monotonic()
    got, reply = raw(port, head)
    assert got == status and reply["error"]["message"].startswith(message), reply
    assert time.monotonic() - start < 5


def test_a_stalled_client_frees_its_thread(port):
    """Half a body, then silence: a 408 after the server's timeout (1 s here); no request at all: closed."""
    start = time.monotonic()
    half = request_bytes({"messages": CHAT})[:-10]
    status, reply = raw(port, half)
    assert status == 408 and "did not arrive within 1s" in reply["error"]["message"]
    assert raw(port, b"") == (None, None)
    assert time.monotonic() - start < 8


def test_a_queued_request_whose_client_left_is_not_started(port, chat, monkeypatch):
    generated, results, done = [], [], threading.Event()
    monkeypatch.setattr(srv, "generate", lambda *a, **k: generated.append(1) or generate(*a, **k))
    complete = chat.complete

    def recorded(request, gone):
        results.append(complete(request, gone))
        done.set()
        return results[-1]

    monkeypatch.setattr(chat, "complete", recorded)
    with chat.lock:  # another request is generating
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_bytes({"messages": CHAT, "max_tokens": 8}))
        time.sleep(0.2)  # the client gave up while it waited
    assert done.wait(10) and results == [None] and not generated


def test_generation_stops_when_the_client_leaves(port, chat, monkeypatch):
    started, stopped = threading.Event(), []

    def endless(model, tokenizer, prompts, *, should_stop, **kwargs):
        started.set()
        deadline = time.monotonic() + 10
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        stopped.append(time.monotonic() < deadline)
        return Samples(prompts, [[1]], ["x"], [False], 1)

    monkeypatch.setattr(srv, "generate", endless)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_bytes({"messages": CHAT, "max_tokens": CAP}))
        assert started.wait(10)
        assert not stopped  # the client is still there, waiting
    deadline = time.monotonic() + 10
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stopped == [True]
    assert chat.lock.acquire(timeout=5)  # the model is free for the next request
    chat.lock.release()


def test_should_stop_ends_every_response_where_it_is(tiny):
    model, tokenizer = tiny
    asked = []
    samples = generate(model, tokenizer, [[5, 6, 7], [8, 9]], num_samples=2, max_new_tokens=20, temperature=1.0,
                       should_stop=lambda: asked.append(1) or True)
    assert asked and all(len(r) == 1 for r in samples.response_ids)
    assert all(done == (r[-1] == tokenizer.eos_token_id) for r, done in zip(samples.response_ids, samples.finished))


def test_a_response_has_the_openai_fields(port, chat):
    status, reply = post(port, {"model": "tiny", "messages": CHAT, "n": 2, "temperature": 1.0, "max_tokens": 1})
    assert status == 200 and reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert isinstance(reply["created"], int) and abs(reply["created"] - time.time()) < 60 and reply["model"] == "tiny"
    prompt = len(chat.prompt_ids(CHAT))
    assert reply["usage"] == {"prompt_tokens": prompt, "completion_tokens": 2, "total_tokens": prompt + 2}
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    # One token: eos (an empty text, "stop") or the start of a response max_tokens cut ("length").
    assert all(c["finish_reason"] == ("length" if c["message"]["content"] else "stop") for c in reply["choices"])
    status, greedy = post(port, {"messages": CHAT, "n": 3, "temperature": 0, "max_tokens": 3})
    assert status == 200 and len({c["message"]["content"] for c in greedy["choices"]}) == 1
    assert len(greedy["choices"]) == 3


def test_finish_reason_and_usage_follow_the_samples():
    samples = Samples([[1, 2]] * 2, [[5, 6, 2], [7, 8, 9, 9]], ["a", "b"], [True, False], 2)
    reply = srv.completion("m", 2, samples, 2)
    assert [c["finish_reason"] for c in reply["choices"]] == ["stop", "length"]
    assert reply["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
    one = srv.completion("m", 2, Samples([[1, 2]], [[5, 2]], ["a"], [True], 1), 3)  # greedy: one stands for n
    assert [c["message"]["content"] for c in one["choices"]] == ["a"] * 3 and one["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("address, has_key, warned", [
    ("127.0.0.1", False, False), ("127.0.0.2", False, False), ("::1", False, False),
    ("0.0.0.0", False, True), ("192.168.1.5", False, True), ("0.0.0.0", True, False),
])
def test_only_a_reachable_server_without_a_key_is_warned_about(address, has_key, warned):
    warning = srv.exposure_warning(address, has_key, "PBKD_SERVE_API_KEY")
    assert (warning is not None) == warned
    if warned:
        assert warning.startswith(f"warning: listening on {address} without an API key") and "\n" not in warning


def test_serve_warns_on_0_0_0_0_without_a_key_and_never_prints_the_key(chat, monkeypatch, capsys):
    def interrupted(self, poll_interval=0.5):
        raise KeyboardInterrupt

    monkeypatch.setattr(srv.ChatModel, "load", classmethod(lambda cls, *args, **kwargs: chat))
    monkeypatch.setattr(srv.ThreadingHTTPServer, "serve_forever", interrupted)
    monkeypatch.delenv("PBKD_SERVE_API_KEY", raising=False)
    srv.serve("/models/tiny", "0.0.0.0", 0, "tiny")
    out, err = capsys.readouterr()
    assert out.startswith("serving /models/tiny as 'tiny' at http://0.0.0.0:")
    assert err.startswith("warning: listening on 0.0.0.0 without an API key") and err.count("\n") == 1
    monkeypatch.setenv("PBKD_SERVE_API_KEY", KEY)
    srv.serve("/models/tiny", "0.0.0.0", 0, "tiny")
    out, err = capsys.readouterr()
    assert err == "" and KEY not in out


def test_the_client_reports_the_servers_message(port):
    endpoint = ChatEndpoint(base_url=f"http://127.0.0.1:{port}/v1", model="tiny", max_retries=0)
    with pytest.raises(PbkdError, match=r"\(HTTP 400: max_tokens=1000000: must be between 1 and 64 "):
        endpoint.complete(CHAT, max_tokens=10**6)


def test_the_servers_message_never_carries_the_key(monkeypatch):
    monkeypatch.setenv("PBKD_TEST_KEY", "sk-secret")

    def refuse(request, timeout):
        body = io.BytesIO(b'{"error": {"message": "bad key sk-secret,\\n try again"}}')
        raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", {}, body)

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(PbkdError) as error:
        ChatEndpoint(base_url="http://x/v1", model="m", api_key_env="PBKD_TEST_KEY", max_retries=0).complete(CHAT)
    assert "(HTTP 401: bad key ***, try again)" in str(error.value) and "sk-secret" not in str(error.value)
