"""A chat-completions server on 127.0.0.1 for the SID captioner tests (tests/test_vlm.py and the
real-ComfyUI test): scripted answers, 429/5xx, garbage, slow answers; records every request."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOD = "A <sks> dog sitting next to a black leather purse with silver hardware on white sheets."


class FakeServer:
    """Chat-completions over HTTP. `script` is a list of behaviours used in order, then `default`:
    ("ok", text) | ("status", code, body) | ("raw", bytes) | ("sleep", seconds, text) | ("json", obj)."""

    def __init__(self):
        self.script: list[tuple] = []
        self.default: tuple = ("ok", GOOD)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    step = outer.script.pop(0) if outer.script else outer.default
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    kind = step[0]
                    if kind == "sleep":
                        time.sleep(step[1])
                        step = ("ok", step[2])
                        kind = "ok"
                    if kind == "ok":
                        payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": step[1]},
                             "finish_reason": "stop"}]}).encode()
                        self._send(200, payload)
                    elif kind == "json":
                        self._send(200, json.dumps(step[1]).encode())
                    elif kind == "raw":
                        self._send(200, step[1], "text/html")
                    elif kind == "status":
                        self._send(step[1], step[2].encode(), headers={"Retry-After": "0"})
                finally:
                    with outer.lock:
                        outer.inflight -= 1

            def _send(self, code, payload, ctype="application/json", headers=None):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
