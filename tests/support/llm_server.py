"""A local LLM endpoint in a thread, for tests on the broker: OpenAI's `/v1/chat/completions` and
Anthropic's `/v1/messages` wire formats.

It records every request body and Authorization header; a request with tools is answered with a
call of the first tool, any other with "pong". Bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: The usage every answer reports.
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


class LocalLLM:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.auth: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                server.calls.append(body)
                server.auth.append(
                    self.headers.get("Authorization", "") or self.headers.get("x-api-key", "")
                )
                if self.path.endswith("/chat/completions"):
                    answer = json.dumps(server.answer(body)).encode()
                elif self.path.endswith("/messages"):
                    answer = json.dumps(server.anthropic_answer(body)).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "pong"}
        finish = "stop"
        if body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            function = {"name": name, "arguments": '{"city":"Paris"}'}
            call = {"id": "call_7", "type": "function", "function": function}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        return {
            "id": f"chatcmpl-{len(self.calls)}",
            "object": "chat.completion",
            "created": 1_760_000_000,
            "model": body.get("model", "unknown"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": USAGE,
        }

    def anthropic_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": "pong"}]
        stop = "end_turn"
        if body.get("tools"):
            name = body["tools"][0]["name"]
            content = [
                {"type": "tool_use", "id": "toolu_7", "name": name, "input": {"city": "Paris"}}
            ]
            stop = "tool_use"
        return {
            "id": f"msg_{len(self.calls)}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "unknown"),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": USAGE["prompt_tokens"], "output_tokens": 3},
        }


@contextmanager
def local_llm() -> Iterator[LocalLLM]:
    server = LocalLLM()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
