"""A small OpenAI-compatible chat-completions server over a local Hugging Face model.

`pbkd serve <model dir>` puts a teacher (or a judge) behind the same protocol as a hosted API, so
that black-box runs, and their response cache, can be exercised end to end on one machine. It
answers `POST /v1/chat/completions` (messages, temperature, top_p, max_tokens, n) and
`GET /v1/models`, one request at a time: it is a test and development server, not vLLM.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

log = logging.getLogger("pbkd")


class ChatModel:
    def __init__(self, name_or_path: str, name: str, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, use_safetensors=True,
                                                          trust_remote_code=trust_remote_code)
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.lock = threading.Lock()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # A base model without a chat template continues the text of the conversation.
        return self.tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]

    def complete(self, request: dict) -> list[str]:
        from pbkd_cli.generation import generate

        n = int(request.get("n", 1))
        temperature = float(request.get("temperature", 1.0))
        with self.lock:
            samples = generate(self.model, self.tokenizer, [self.prompt_ids(request["messages"])],
                               num_samples=n if temperature > 0 else 1, temperature=temperature,
                               top_p=float(request.get("top_p", 1.0)),
                               max_new_tokens=int(request.get("max_tokens", 256)))
        return samples.texts * (n if temperature == 0 else 1)


def make_server(chat: ChatModel, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                texts = chat.complete(request)
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": {"message": f"bad request: {exc}"}})
                return
            self._send(200, {"object": "chat.completion", "model": chat.name, "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                for i, t in enumerate(texts)]})

    return ThreadingHTTPServer((host, port), Handler)


def serve(name_or_path: str, host: str, port: int, name: str) -> None:
    server = make_server(ChatModel(name_or_path, name), host, port)
    print(f"serving {name_or_path} as '{name}' at http://{host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
