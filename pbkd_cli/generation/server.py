"""A small OpenAI-compatible chat-completions server over a local Hugging Face model.

`pbkd serve <model dir>` puts a teacher (or a judge) behind the same protocol as a hosted API, so
that black-box runs, and their response cache, can be exercised end to end on one machine. It
answers `POST /v1/chat/completions` (messages, temperature, top_p, max_tokens, n; no streaming) and
`GET /v1/models`, one generation at a time: it is a test and development server, not vLLM.

It is still safe to leave running: a bearer key (from an environment variable) guards it when set,
request bodies, max_tokens and n are capped, a bad request is a 4xx with a JSON error message, and a
client that stalls or goes away frees its thread and the model.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

import torch

from pbkd_cli.generation.hf import Samples, generate

log = logging.getLogger("pbkd")

API_KEY_ENV = "PBKD_SERVE_API_KEY"
MAX_BODY_BYTES = 4 * 2**20  # far more text than any context holds
MAX_N = 16
DEFAULT_MAX_TOKENS = 256  # when a request names none
TIMEOUT_S = 30.0
_DRAIN_LIMIT = 64 * 2**20
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


class BadRequest(Exception):
    """A request the server refuses: the HTTP status and the one-line message the client gets."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    n: int
    temperature: float
    top_p: float
    max_tokens: int


def _shown(value) -> str:
    return json.dumps(value)[:40]


def _integer(body: dict, key: str, default: int, high: int, why: str = "") -> int:
    value = body.get(key, default)
    # bool is an int to Python, and 2.0 is a float: neither is a count in the API.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {_shown(value)}")
    if not 1 <= value <= high:
        raise BadRequest(f"{key}={value}: must be between 1 and {high}{why}")
    return value


def _number(body: dict, key: str, default: float, ok: Callable[[float], bool], wanted: str) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise BadRequest(f"{key} must be {wanted}, got {_shown(value)}")
    return float(value)


def parse_request(body, max_tokens_cap: int) -> ChatRequest:
    """The checked fields of a chat-completions body; BadRequest names the first one that is wrong."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, not {_JSON_TYPES.get(type(body), 'that')}")
    if body.get("stream"):
        raise BadRequest("stream is not supported; send stream=false")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty array")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BadRequest(f"messages[{i}] must be an object with a string role and a string content")
    return ChatRequest(
        messages=messages,
        n=_integer(body, "n", 1, MAX_N),
        temperature=_number(body, "temperature", 1.0, lambda t: t >= 0, "a number >= 0"),
        top_p=_number(body, "top_p", 1.0, lambda p: 0 < p <= 1, "a number in (0, 1]"),
        max_tokens=_integer(body, "max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_cap), max_tokens_cap,
                            " (this server's cap, pbkd serve --max-tokens)"),
    )


def _json_body(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 is a ValueError too; deep nesting recurses
        raise BadRequest(f"the body is not JSON ({exc})") from None


class ChatModel:
    def __init__(self, model, tokenizer, name: str, max_tokens: int | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        context = getattr(model.config, "max_position_embeddings", None)
        # Every request's generation is bounded, so no client holds the model longer than this many steps.
        self.max_tokens = max_tokens or min(4096, context or 4096)
        self.lock = threading.Lock()

    @classmethod
    def load(cls, name_or_path: str, name: str, max_tokens: int | None = None,
             trust_remote_code: bool = False) -> "ChatModel":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(name_or_path, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        return cls(model, tokenizer, name, max_tokens)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.tokenizer.chat_template:
            # Rendered, then tokenized: with tokenize=True transformers 4 returns ids and 5 a BatchEncoding.
            # The template writes its own special tokens, so the tokenizer adds none (as tokenize=True does).
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # the template is the model's: its refusals are about these messages
                raise BadRequest(f"the model's chat template refused the messages ({exc})") from None
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # A base model without a chat template continues the text of the conversation.
        return self.tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]

    def complete(self, request: ChatRequest, gone: Callable[[], bool] = lambda: False) -> dict | None:
        """The chat.completion answering `request`, or None once `gone()` says its client left."""
        greedy = request.temperature == 0
        with self.lock:
            # A request that queued here while its client gave up would generate for no one.
            if gone():
                return None
            # Under the lock too: a fast tokenizer used by two threads at once can fail ("Already borrowed").
            prompt = self.prompt_ids(request.messages)
            if not prompt:  # nothing to continue (a base model's empty message): generate would fail
                raise BadRequest("the messages make an empty prompt")
            samples = generate(self.model, self.tokenizer, [prompt], num_samples=1 if greedy else request.n,
                               temperature=request.temperature, top_p=request.top_p,
                               max_new_tokens=request.max_tokens, should_stop=gone)
        if gone():
            return None
        return completion(self.name, len(prompt), samples, request.n)


def completion(model: str, prompt_tokens: int, samples: Samples, n: int) -> dict:
    """The OpenAI chat.completion of `n` choices from `samples` (one greedy sample stands for all n)."""
    rows = [i * len(samples.texts) // n for i in range(n)]
    choices = [{"index": i, "message": {"role": "assistant", "content": samples.texts[r]}, "logprobs": None,
                # Unfinished means max_tokens cut the response before eos.
                "finish_reason": "stop" if samples.finished[r] else "length"} for i, r in enumerate(rows)]
    completion_tokens = sum(len(samples.response_ids[r]) for r in rows)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def _error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


def make_server(chat: ChatModel, host: str, port: int, *, api_key: str | None = None,
                max_body: int = MAX_BODY_BYTES, timeout_s: float = TIMEOUT_S) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        # A client that stalls (a half-sent request, a response it does not read) frees its thread after this.
        timeout = timeout_s

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                   **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client went away or stopped reading: there is no one to tell
                self.close_connection = True

        def _error(self, status: int, message: str) -> None:
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            self._send(status, {"error": {"message": message, "type": _error_type(status), "code": status}},
                       headers)

        def send_error(self, code, message=None, explain=None):
            # http.server's own refusals (a malformed request line, an unknown method) in the API's form too.
            self.log_error("code %d, message %s", code, message)
            self.close_connection = True
            self._error(code, message or self.responses.get(code, ("error",))[0])

        def _authorize(self) -> None:
            if api_key is None:
                return
            scheme, _, sent = self.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how much of a guess was right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), api_key.encode()):
                raise BadRequest("missing or wrong API key (send Authorization: Bearer <key>)", 401)

        def _route(self) -> str:
            return urlsplit(self.path).path.rstrip("/")

        def _drain(self, length: int) -> None:
            """Read and drop a refused body: a client still sending it when the connection closes gets a
            reset, not the 413. Past _DRAIN_LIMIT (or a stall) it is not worth the wait."""
            left = length if length <= _DRAIN_LIMIT else 0
            try:
                while left > 0:
                    chunk = self.rfile.read(min(left, 2**16))
                    if not chunk:
                        return
                    left -= len(chunk)
            except OSError:
                pass

        def _body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:  # a chunked body is not read: without a length, where it ends is unknown
                raise BadRequest("a Content-Length header is required", 411)
            if not re.fullmatch(r"[0-9]+", length.strip()):
                raise BadRequest(f"Content-Length must be a non-negative integer, got {length[:20]!r}")
            size = int(length)
            if size > max_body:
                self._drain(size)
                raise BadRequest(f"the body has {size} bytes, more than this server takes ({max_body}, "
                                 f"pbkd serve --max-body-bytes)", 413)
            data = self.rfile.read(size)
            if len(data) < size:
                raise BadRequest(f"the body ended after {len(data)} of its {size} bytes")
            return data

        def _gone(self) -> bool:
            """Whether the client closed its connection (it gave up waiting, or was killed)."""
            sock, timeout = self.connection, self.connection.gettimeout()
            try:
                sock.settimeout(0)  # a look, not a wait
                # A waiting client sends nothing; end of stream (b"") means it closed.
                return sock.recv(1, socket.MSG_PEEK) == b""  # a peek leaves any data to the reader
            except BlockingIOError:
                return False
            except OSError:  # reset by the peer
                return True
            finally:
                sock.settimeout(timeout)

        def do_GET(self):
            try:
                self._authorize()
                if self._route() != "/v1/models":
                    raise BadRequest(f"no route {self.path[:100]}", 404)
            except BadRequest as exc:
                self._error(exc.status, str(exc))
                return
            self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model",
                                                        "owned_by": "pbkd"}]})

        def do_POST(self):
            try:
                # The body is read first, even to refuse it: unread data makes the close a reset.
                body = self._body()
                self._authorize()
                if self._route() != "/v1/chat/completions":
                    raise BadRequest(f"no route {self.path[:100]}", 404)
                response = chat.complete(parse_request(_json_body(body), chat.max_tokens), gone=self._gone)
            except BadRequest as exc:
                self._error(exc.status, str(exc))
                return
            except TimeoutError:
                self._error(408, f"the request did not arrive within {timeout_s:g}s")
                return
            except ConnectionError:  # reset while sending its request: no one to answer
                self.close_connection = True
                return
            except Exception as exc:  # a bug, or out of memory: a 500 for the client, the traceback here
                log.exception("chat completion failed")
                self._error(500, f"internal error ({type(exc).__name__}: {_first_line(exc)})")
                return
            if response is None:
                log.warning("%s: the client went away; its completion was dropped", self.address_string())
                self.close_connection = True
                return
            self._send(200, response)

    return ThreadingHTTPServer((host, port), Handler)


def exposure_warning(address: str, has_key: bool, api_key_env: str) -> str | None:
    """The one-line warning for a server that other machines can reach and that takes no key."""
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if has_key or loopback:
        return None
    return (f"warning: listening on {address} without an API key: anyone who can reach this port can use "
            f"the model (set {api_key_env} to require a bearer key)")


def serve(name_or_path: str, host: str, port: int, name: str, *, api_key_env: str = API_KEY_ENV,
          max_tokens: int | None = None, max_body: int = MAX_BODY_BYTES, timeout_s: float = TIMEOUT_S) -> None:
    api_key = os.environ.get(api_key_env) or None  # an empty variable is no key, as for the client
    server = make_server(ChatModel.load(name_or_path, name, max_tokens), host, port, api_key=api_key,
                         max_body=max_body, timeout_s=timeout_s)
    warning = exposure_warning(server.server_address[0], api_key is not None, api_key_env)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"serving {name_or_path} as '{name}' at http://{host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
