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
import time

from fakelib import CredentialState, FakeHandler, aws_time, serve

ROLE = "dispatch-cloud-test-role"


class Handler(FakeHandler):
    state = CredentialState()

    def text(self, status, body):
        return self.reply_raw(status, body, "text/plain")

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
                "LastUpdated": aws_time(time.time()),
                "Type": "AWS-HMAC",
                "AccessKeyId": creds["AccessKeyId"],
                "SecretAccessKey": creds["SecretAccessKey"],
                "Token": creds.get("Token", ""),
                "Expiration": aws_time(expires_at),
            }
            return self.reply(200, body)
        return self.text(404, "")


if __name__ == "__main__":
    serve(Handler)
