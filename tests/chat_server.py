"""A real OpenAI-compatible chat-completions server on loopback, answering with a Python function."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

# (request body, request headers) -> the texts of the choices
Reply = Callable[[dict, dict], list[str]]


@contextlib.contextmanager
def chat_server(reply: Reply) -> Iterator[str]:
    """Serve `reply` at http://127.0.0.1:<free port>/v1/chat/completions; yield the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            texts = reply(body, dict(self.headers))
            payload = json.dumps({"choices": [{"index": i, "message": {"role": "assistant", "content": t}}
                                              for i, t in enumerate(texts)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
