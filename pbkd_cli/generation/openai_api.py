"""A client for OpenAI-compatible chat-completion endpoints (a black-box teacher, an LLM judge).

The API key is read from the environment variable the config names, never from the config itself,
and never logged. Responses are cached on disk by request, so a rerun (a resumed collection, the
same prompts in another experiment) costs no API calls; the key is not part of the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pbkd_cli.io import PbkdError, atomic_write_json

log = logging.getLogger("pbkd")


def _server_message(exc: urllib.error.HTTPError, key: str | None) -> str:
    """': <message>' from the server's OpenAI-style error body ({"error": {"message": ...}}), or ''."""
    try:
        error = json.loads(exc.read(2**16)).get("error")
    except (OSError, ValueError, AttributeError):  # no body, not JSON, not an object, or it timed out
        return ""
    message = error.get("message") if isinstance(error, dict) else error
    if not message:
        return ""
    message = str(message).replace(key, "***") if key else str(message)  # never logged, even if echoed back
    return ": " + " ".join(message.split())[:300]  # one line, whatever the server sent


@dataclass(frozen=True)
class ChatEndpoint:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    concurrency: int = 4
    config_key: str = "api"  # where the endpoint is configured, for error messages
    cache_dir: str | None = None

    def _cache_file(self, body: bytes) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(self.base_url.rstrip("/").encode() + b"\n" + body).hexdigest()
        return Path(self.cache_dir).expanduser() / key[:2] / f"{key}.json"

    def complete(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 256,
                 n: int = 1) -> list[str]:
        """The texts of `n` completions of one chat (from the cache when this request was made before)."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens, "n": n}, sort_keys=True).encode()
        cached = self._cache_file(body)
        if cached is not None and cached.is_file():
            return json.loads(cached.read_text())["texts"]
        texts = self._request(body)
        if cached is not None:
            atomic_write_json(cached, {"texts": texts})
        return texts

    def _request(self, body: bytes) -> list[str]:
        """POST one request, retrying with backoff on transient failures."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(2.0 ** (attempt - 1), 30.0))
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read())
                return [choice["message"]["content"] for choice in payload["choices"]]
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}{_server_message(exc, key)}"
                if exc.code not in (408, 409, 429) and exc.code < 500:
                    break  # a client error will not go away by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last_error = str(getattr(exc, "reason", exc))
            except (KeyError, IndexError, json.JSONDecodeError):
                last_error = "the response is not an OpenAI chat completion"
                break
            log.warning("%s: attempt %d failed (%s)", url, attempt + 1, last_error)
        raise PbkdError(f"{self.config_key}.base_url={self.base_url}: request failed after "
                        f"{attempt + 1} attempt(s) ({last_error})")

    def complete_many(self, chats: list[list[dict]], **kwargs) -> list[list[str]]:
        """`complete` for many chats, at most `concurrency` in flight, results in order."""
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda chat: self.complete(chat, **kwargs), chats))
