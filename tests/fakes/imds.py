#!/usr/bin/env python3
"""The EC2 instance metadata service, IMDSv2 only, for the AWS driver's credential tests.

A session token first (PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds), then,
with X-aws-ec2-metadata-token, the instance role's name and its credentials as EC2 documents
them (Code, AccessKeyId, SecretAccessKey, Token, Expiration). IMDSv1 requests (no token) get
401, as on an instance with IMDSv2 required.

Test-only controls: POST /fake/credentials {"AccessKeyId", "SecretAccessKey", "Token",
"expires_in"} sets what is handed out; GET /fake/requests is the request log.
Prints "listening on http://127.0.0.1:PORT"; exits when its stdin closes. Standard library
only.
"""

import json
import secrets
import threading
import time

from fakelib import FakeHandler, serve

ROLE = "dispatch-cloud-test-role"


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = set()
        self.credentials = None
        self.expires_at = 0.0
        self.requests = []
        self.injected = []


def rfc3339(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Handler(FakeHandler):
    state = State()

    def text(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self.entry is not None:
            self.entry["status"] = status

    def route(self, method):
        s = self.state
        path = self.path.split("?", 1)[0]
        raw = self.read_body()
        if path.startswith("/fake/"):
            self.entry = None
            with s.lock:
                if path == "/fake/requests":
                    return self.reply(200, s.requests)
                if path == "/fake/credentials":
                    arg = json.loads(raw)
                    s.expires_at = time.time() + float(arg.pop("expires_in"))
                    s.credentials = arg
                    return self.reply(200, {})
            return self.reply(404, {"error": "no such control"})
        self.entry = {"method": method, "path": path}
        with s.lock:
            s.requests.append(self.entry)
        if path == "/latest/api/token" and method == "PUT":
            if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self.text(400, "missing X-aws-ec2-metadata-token-ttl-seconds")
            token = secrets.token_urlsafe(24)
            with s.lock:
                s.tokens.add(token)
            return self.text(200, token)
        with s.lock:
            authorized = self.headers.get("X-aws-ec2-metadata-token") in s.tokens
        if not authorized:
            return self.text(401, "")
        base = "/latest/meta-data/iam/security-credentials/"
        if path == base and method == "GET":
            return self.text(200, ROLE + "\n")
        if path == base + ROLE and method == "GET":
            with s.lock:
                creds, expires_at = s.credentials, s.expires_at
            if creds is None:
                return self.text(404, "")
            body = {
                "Code": "Success",
                "LastUpdated": rfc3339(time.time()),
                "Type": "AWS-HMAC",
                "AccessKeyId": creds["AccessKeyId"],
                "SecretAccessKey": creds["SecretAccessKey"],
                "Token": creds.get("Token", ""),
                "Expiration": rfc3339(expires_at),
            }
            return self.reply(200, body)
        return self.text(404, "")


if __name__ == "__main__":
    serve(Handler)
