#!/usr/bin/env python3
"""AWS STS's AssumeRoleWithWebIdentity, for the AWS driver's web-identity credential test.

Speaks the Query API as STS documents it: a form POST (Action, Version, RoleArn,
RoleSessionName, WebIdentityToken, DurationSeconds), unsigned, answered with
AssumeRoleWithWebIdentityResponse XML, or ErrorResponse XML (InvalidIdentityToken) when the
token is not the one the test set.

Test-only controls: POST /fake/credentials {"AccessKeyId", "SecretAccessKey", "SessionToken",
"expires_in", "token"} sets what is handed out and the token accepted; GET /fake/requests is
the request log (with the token each call carried).
Prints "listening on http://127.0.0.1:PORT"; exits when its stdin closes. Standard library
only.
"""

import json
import time
import urllib.parse
from xml.sax.saxutils import escape

from fakelib import CredentialState, FakeHandler, aws_time, serve


class Handler(FakeHandler):
    state = CredentialState()

    def xml(self, status, body):
        return self.reply_raw(status, body, "text/xml")

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
                    arg["expires_at"] = time.time() + float(arg.pop("expires_in"))
                    s.credentials = arg
                    return self.reply(200, {})
            return self.reply(404, {"error": "no such control"})
        form = dict(urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True))
        self.entry = {
            "method": method,
            "action": form.get("Action"),
            "role": form.get("RoleArn"),
            "token": form.get("WebIdentityToken"),
            "signed": "Authorization" in self.headers,
        }
        with s.lock:
            s.requests.append(self.entry)
            creds = s.credentials
        if method != "POST" or form.get("Action") != "AssumeRoleWithWebIdentity":
            return self.xml(400, error("InvalidAction", "only AssumeRoleWithWebIdentity"))
        if creds is None or form.get("WebIdentityToken") != creds["token"]:
            return self.xml(400, error("InvalidIdentityToken", "the token is not valid"))
        body = (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult>"
            "<SubjectFromWebIdentityToken>system:serviceaccount:dispatch:cloud</SubjectFromWebIdentityToken>"
            "<Credentials>"
            "<AccessKeyId>%s</AccessKeyId><SecretAccessKey>%s</SecretAccessKey>"
            "<SessionToken>%s</SessionToken><Expiration>%s</Expiration>"
            "</Credentials>"
            "<AssumedRoleUser><Arn>%s/dispatch-cloud</Arn><AssumedRoleId>AROA:dispatch-cloud</AssumedRoleId></AssumedRoleUser>"
            "</AssumeRoleWithWebIdentityResult>"
            "<ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>"
        ) % (
            escape(creds["AccessKeyId"]),
            escape(creds["SecretAccessKey"]),
            escape(creds.get("SessionToken", "")),
            aws_time(creds["expires_at"]),
            escape(form.get("RoleArn", "")),
        )
        return self.xml(200, body)


def error(code, message):
    return (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        "<Error><Type>Sender</Type><Code>%s</Code><Message>%s</Message></Error>"
        "<RequestId>fake</RequestId></ErrorResponse>" % (code, escape(message))
    )


if __name__ == "__main__":
    serve(Handler)
