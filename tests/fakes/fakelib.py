"""What the in-repo cloud fakes share: JSON replies, the request log entry, injected faults,
and serving on a free port of 127.0.0.1 until the test that started them closes their stdin.
Standard library only."""

import json
import os
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHandler(BaseHTTPRequestHandler):
    """Dispatches every method to `route(method)`; `self.entry` is this request's log entry
    (or None), whose status `reply` fills in. `self.state` must have `injected` (a list)."""

    protocol_version = "HTTP/1.1"
    state = None

    def log_message(self, fmt, *args):  # the request log is /fake/requests
        pass

    def do_GET(self):
        self.route("GET")

    def do_PUT(self):
        self.route("PUT")

    def do_PATCH(self):
        self.route("PATCH")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")

    def route(self, method):
        raise NotImplementedError

    def reply(self, status, body=None, headers=None):
        """A JSON answer (no body for None)."""
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        if getattr(self, "entry", None) is not None:
            self.entry["status"] = status

    def reply_raw(self, status, body, content_type):
        """A text answer (an IMDS token, STS's XML) instead of JSON."""
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if getattr(self, "entry", None) is not None:
            self.entry["status"] = status

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def injected_for(self, method, path):
        """The first queued fault matching this call (`match`: `method`, `path` regex),
        consumed once its `times` run out. Call with the state lock held."""
        for fault in self.state.injected:
            m = fault.get("match", {})
            if m.get("method", method) != method or not re.search(m.get("path", ""), path):
                continue
            fault["times"] -= 1
            if fault["times"] <= 0:
                self.state.injected.remove(fault)
            return fault
        return None


class CredentialState:
    """What the credential fakes (IMDS, STS) keep: the keys handed out, the request log."""

    def __init__(self):
        self.lock = threading.Lock()
        self.credentials = None
        self.expires_at = 0.0
        # IMDSv2 session tokens handed out.
        self.tokens = set()
        self.requests = []
        self.injected = []


def aws_time(t):
    """A Unix time as AWS writes expirations: 2026-11-29T08:37:03Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def serve(handler, cert=None, key=None):
    """Serves `handler` on a free port (HTTPS with `cert`/`key`), prints
    "listening on URL" (and, over HTTPS, "control on URL": the same handler over plain HTTP,
    for test clients without TLS), then waits for stdin to close and exits."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    scheme = "http"
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    handler.base = "%s://127.0.0.1:%d" % (scheme, server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("listening on " + handler.base, flush=True)
    if cert:
        control = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        control.daemon_threads = True
        threading.Thread(target=control.serve_forever, daemon=True).start()
        print("control on http://127.0.0.1:%d" % control.server_address[1], flush=True)
    # The test holds our stdin: when it goes away, so do we.
    try:
        sys.stdin.read()
    finally:
        os._exit(0)
