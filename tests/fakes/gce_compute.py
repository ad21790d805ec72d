#!/usr/bin/env python3
"""A small Google Compute Engine API server for the GCE driver's tests.

It speaks the documented REST/JSON wire format (compute/v1, Google's field names, int64 as
strings, base64 fingerprints, zone operations) for the calls the driver makes, plus an OAuth
token endpoint (refresh-token grant) whose bearer tokens every Compute call must carry.

Test-only controls live under /fake/: injected errors, a request log, guest attributes, a
metadata writer racing the next read, the operation delay. Standard library only.

Usage: gce_compute.py [--operation-delay SECONDS] [--service-account-public FILE]
(FILE: {"client_email", "n" (hex), "e"}: whose self-signed RS256 JWTs are accepted as bearer
tokens, as Google accepts them from service-account keys.)
Prints "listening on http://127.0.0.1:PORT" once ready. Exits when its stdin closes, so it
never outlives the test that started it.
"""

import argparse
import base64
import hashlib
import json
import re
import secrets
import threading
import time
import urllib.parse

from fakelib import FakeHandler, serve

CLIENT_ID = "fake-client-id.apps.googleusercontent.com"
CLIENT_SECRET = "fake-client-secret"
REFRESH_TOKEN = "fake-refresh-token"
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_FILTER_RE = re.compile(r'^\s*labels\.([a-z][-_a-z0-9]*)\s*=\s*"?([-_a-z0-9]*)"?\s*$')


def fingerprint():
    # GCE fingerprints are URL-safe base64 (e.g. "9lLhWxGZx-k="); the client decodes them so.
    return base64.urlsafe_b64encode(secrets.token_bytes(8)).decode()


def google_error(code, message, status=None, reason=None, details=None):
    """An error body in the shape Compute documents."""
    body = {"code": code, "message": message}
    if reason:
        body["errors"] = [{"message": message, "domain": "global", "reason": reason}]
    if status:
        body["status"] = status
    if details:
        body["details"] = details
    return {"error": body}


def b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# DER of the DigestInfo prefix for SHA-256 in an RSASSA-PKCS1-v1_5 signature (RFC 8017 9.2).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def jwt_valid(token, account):
    """Checks a self-signed RS256 JWT from a service-account key: signature, issuer, expiry."""
    try:
        head, body, sig = token.split(".")
        header = json.loads(b64url(head))
        claims = json.loads(b64url(body))
        if header.get("alg") != "RS256" or claims.get("iss") != account["client_email"]:
            return False
        if not claims.get("exp", 0) > time.time():
            return False
        n, e = int(account["n"], 16), int(account["e"])
        k = (n.bit_length() + 7) // 8
        em = pow(int.from_bytes(b64url(sig), "big"), e, n).to_bytes(k, "big")
        digest = hashlib.sha256((head + "." + body).encode()).digest()
        expected = b"\x00\x01" + b"\xff" * (k - 3 - len(SHA256_DIGEST_INFO) - 32) + b"\x00" + SHA256_DIGEST_INFO + digest
        return em == expected
    except (ValueError, KeyError, TypeError):
        return False


class State:
    def __init__(self, operation_delay, service_account=None):
        self.service_account = service_account
        self.lock = threading.Condition()
        self.operation_delay = operation_delay
        self.tokens = set()
        self.instances = {}  # (project, zone, name) -> instance dict
        self.operations = {}  # (project, zone, op name) -> Operation
        self.guest_attributes = {}  # (project, zone, name) -> [entry]
        self.injected = []  # [{"match": {...}, "times": n, "respond"|"operation_error": ...}]
        self.races = set()  # instance names whose next GET is followed by a metadata write
        self.requests = []
        self.next_id = 1000
        self.next_ip = 2

    def new_id(self):
        self.next_id += 1
        return str(self.next_id * 7919)


class Operation:
    """A zone operation: PENDING, then RUNNING, then DONE after the delay; `effect` runs once
    when it is done, `error` (if any) is reported instead."""

    def __init__(self, state, project, zone, op_type, target, effect, error=None):
        self.name = "operation-%d-%s" % (int(time.time() * 1000), secrets.token_hex(4))
        self.project, self.zone, self.type, self.target = project, zone, op_type, target
        self.effect, self.error = effect, error
        self.started = time.monotonic()
        self.delay = state.operation_delay
        self.applied = False

    def status(self):
        elapsed = time.monotonic() - self.started
        if elapsed >= self.delay:
            return "DONE"
        return "PENDING" if elapsed < self.delay / 3 else "RUNNING"

    def settle(self):
        """Applies the effect once the operation is done (under the state lock)."""
        if self.status() == "DONE" and not self.applied:
            self.applied = True
            if self.effect:
                self.effect(self.error)

    def json(self):
        self.settle()
        zone_url = "https://www.googleapis.com/compute/v1/projects/%s/zones/%s" % (
            self.project,
            self.zone,
        )
        out = {
            "kind": "compute#operation",
            "id": str(abs(hash(self.name)) % (10**18)),
            "name": self.name,
            "zone": zone_url,
            "operationType": self.type,
            "targetLink": "%s/instances/%s" % (zone_url, self.target),
            "status": self.status(),
            "progress": 100 if self.status() == "DONE" else 0,
            "selfLink": "%s/operations/%s" % (zone_url, self.name),
        }
        if self.status() == "DONE" and self.error:
            out["error"] = {"errors": self.error.get("errors", [])}
            if "httpErrorStatusCode" in self.error:
                out["httpErrorStatusCode"] = self.error["httpErrorStatusCode"]
                out["httpErrorMessage"] = self.error.get("httpErrorMessage", "ERROR")
        return out


class Handler(FakeHandler):
    state = None  # set in main

    def route(self, method):
        self.entry = None
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        raw = self.read_body()
        path = url.path
        try:
            if path == "/token" and method == "POST":
                return self.token(raw)
            if path.startswith("/computeMetadata/v1/"):
                return self.metadata_server(path)
            if path.startswith("/fake/"):
                return self.control(method, path, raw)
            if path.startswith("/compute/v1/"):
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = raw.decode(errors="replace")
                auth = self.headers.get("Authorization", "")
                token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
                s = self.state
                with s.lock:
                    authorized = token in s.tokens or (
                        s.service_account is not None and token.count(".") == 2
                        and jwt_valid(token, s.service_account))
                    self.entry = {
                        "method": method,
                        "path": path,
                        "query": query,
                        "body": parsed,
                        "authorized": authorized,
                        "status": None,
                    }
                    s.requests.append(self.entry)
                if not authorized:
                    return self.reply(
                        401,
                        google_error(
                            401,
                            "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                            "UNAUTHENTICATED",
                        ),
                    )
                return self.compute(method, path[len("/compute/v1/"):], query, parsed)
            self.reply(404, google_error(404, "no such path: %s" % path, "NOT_FOUND"))
        except Exception as e:  # a bug here must show in the test, not hang it
            self.reply(500, google_error(500, "fake server error: %r" % e, "INTERNAL"))

    # ---- OAuth ----------------------------------------------------------------------------

    def token(self, raw):
        # Google's token endpoint takes the grant as a form or as JSON; clients use both.
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(raw or b"{}")
        else:
            form = dict(urllib.parse.parse_qsl(raw.decode()))
        ok = (
            form.get("grant_type") == "refresh_token"
            and form.get("client_id") == CLIENT_ID
            and form.get("client_secret") == CLIENT_SECRET
            and form.get("refresh_token") == REFRESH_TOKEN
        )
        if not ok:
            return self.reply(
                400,
                {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
            )
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        with self.state.lock:
            self.state.tokens.add(token)
        self.reply(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer",
                         "scope": form.get("scope", "")})

    def metadata_server(self, path):
        """The GCE metadata server's token, as a VM's default service account gets it."""
        if self.headers.get("Metadata-Flavor") != "Google":
            return self.reply(403, {"error": "Missing Metadata-Flavor:Google header."})
        if path == "/computeMetadata/v1/instance/service-accounts/default/token":
            token = "ya29.fake-mds-" + secrets.token_urlsafe(24)
            with self.state.lock:
                self.state.tokens.add(token)
            return self.reply(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})
        if path == "/computeMetadata/v1/universe/universe-domain":
            data = b"googleapis.com"
            self.send_response(200)
            self.send_header("Content-Type", "application/text")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        return self.reply(404, {"error": "no such metadata path"})

    # ---- test controls --------------------------------------------------------------------

    def control(self, method, path, raw):
        s = self.state
        arg = json.loads(raw) if raw else {}
        with s.lock:
            if path == "/fake/requests" and method == "GET":
                return self.reply(200, s.requests)
            if path == "/fake/inject" and method == "POST":
                arg.setdefault("times", 1)
                s.injected.append(arg)
                return self.reply(200, {"queued": len(s.injected)})
            if path == "/fake/guest-attributes" and method == "POST":
                key = (arg["project"], arg["zone"], arg["instance"])
                s.guest_attributes[key] = arg["items"]
                return self.reply(200, {})
            if path == "/fake/race-metadata" and method == "POST":
                s.races.add(arg["instance"])
                return self.reply(200, {})
            if path == "/fake/instances" and method == "GET":
                for op in list(s.operations.values()):
                    op.settle()
                return self.reply(200, [i for i in s.instances.values()])
        self.reply(404, {"error": "no such control"})

    # ---- Compute --------------------------------------------------------------------------

    def compute(self, method, rest, query, body):
        s = self.state
        parts = rest.split("/")
        if len(parts) == 4 and parts[0] == "projects" and parts[2:] == ["aggregated", "instances"] and method == "GET":
            with s.lock:
                fault = self.injected_for(method, "/" + rest)
                if fault and "respond" in fault:
                    r = fault["respond"]
                    return self.reply(r["status"], r["body"], r.get("headers"))
                return self.aggregated(parts[1], query)
        # projects/{p}/zones/{z}/{collection}[/{name}[/{verb}]]
        if len(parts) < 5 or parts[0] != "projects" or parts[2] != "zones":
            return self.reply(404, google_error(404, "The resource '%s' was not found" % rest,
                                                "NOT_FOUND", "notFound"))
        project, zone, collection, tail = parts[1], parts[3], parts[4], parts[5:]
        with s.lock:
            fault = self.injected_for(method, "/" + rest)
            if fault and "respond" in fault:
                r = fault["respond"]
                return self.reply(r["status"], r["body"], r.get("headers"))
            op_error = fault.get("operation_error") if fault else None
            if collection == "operations":
                return self.operation(method, project, zone, tail)
            if collection != "instances":
                return self.reply(404, google_error(404, "The resource '%s' was not found" % rest,
                                                    "NOT_FOUND", "notFound"))
            if not tail:
                if method == "POST":
                    return self.insert(project, zone, body, op_error)
                if method == "GET":
                    return self.list(project, zone, query)
            else:
                name = tail[0]
                key = (project, zone, name)
                if key not in s.instances:
                    return self.reply(404, google_error(
                        404, "The resource 'projects/%s/zones/%s/instances/%s' was not found"
                        % (project, zone, name), "NOT_FOUND", "notFound"))
                verb = tail[1] if len(tail) > 1 else None
                if verb is None and method == "GET":
                    return self.get(key)
                if verb is None and method == "DELETE":
                    return self.delete(key, op_error)
                if verb == "setMetadata" and method == "POST":
                    return self.set_metadata(key, body, op_error)
                if verb == "getGuestAttributes" and method == "GET":
                    return self.guest(key, query)
        self.reply(400, google_error(400, "unsupported call %s %s" % (method, rest), "INVALID_ARGUMENT"))

    def operation(self, method, project, zone, tail):
        s = self.state
        op = s.operations.get((project, zone, tail[0] if tail else ""))
        if op is None:
            return self.reply(404, google_error(404, "operation not found", "NOT_FOUND", "notFound"))
        if len(tail) > 1 and tail[1] == "wait" and method == "POST":
            # Like GCE: returns when the operation is done, or after a while regardless.
            deadline = time.monotonic() + 1.0
            while op.status() != "DONE" and time.monotonic() < deadline:
                s.lock.wait(timeout=0.05)
        return self.reply(200, op.json())

    def start(self, project, zone, op_type, target, effect, error):
        s = self.state
        op = Operation(s, project, zone, op_type, target, effect, error)
        s.operations[(project, zone, op.name)] = op
        return self.reply(200, op.json())

    def insert(self, project, zone, body, op_error):
        s = self.state
        if not isinstance(body, dict) or not NAME_RE.match(body.get("name", "")):
            return self.reply(400, google_error(
                400, "Invalid value for field 'resource.name': %r. Must be a match of regex "
                "'[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?'" % (body or {}).get("name"),
                "INVALID_ARGUMENT", "invalid"))
        key = (project, zone, body["name"])
        if key in s.instances:
            return self.reply(409, google_error(
                409, "The resource 'projects/%s/zones/%s/instances/%s' already exists"
                % key, "ALREADY_EXISTS", "alreadyExists"))
        mt = body.get("machineType", "")
        if not mt.startswith("zones/%s/machineTypes/" % zone):
            return self.reply(400, google_error(
                400, "Invalid value for field 'resource.machineType': %r." % mt,
                "INVALID_ARGUMENT", "invalid"))
        s.next_ip += 1
        zone_url = "https://www.googleapis.com/compute/v1/projects/%s/zones/%s" % (project, zone)
        instance = dict(body)
        instance.update({
            "kind": "compute#instance",
            "id": s.new_id(),
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
            "zone": zone_url,
            "machineType": "%s/machineTypes/%s" % (zone_url, mt.rsplit("/", 1)[-1]),
            "status": "PROVISIONING",
            "selfLink": "%s/instances/%s" % (zone_url, body["name"]),
            "fingerprint": fingerprint(),
        })
        nics = [dict(n) for n in body.get("networkInterfaces") or [{}]]
        nics[0]["networkIP"] = "10.128.%d.%d" % (s.next_ip // 250, s.next_ip % 250 + 2)
        nics[0].setdefault("network", "https://www.googleapis.com/compute/v1/projects/%s/global/networks/default" % project)
        nics[0]["name"] = "nic0"
        instance["networkInterfaces"] = nics
        metadata = dict(body.get("metadata") or {})
        metadata["kind"] = "compute#metadata"
        metadata["fingerprint"] = fingerprint()
        instance["metadata"] = metadata
        # Like GCE: the instance is listed (PROVISIONING) while the insert runs.
        s.instances[key] = instance

        def effect(error):
            if error:
                s.instances.pop(key, None)
            elif key in s.instances:
                s.instances[key]["status"] = "RUNNING"

        self.start(project, zone, "insert", body["name"], effect, op_error)

    def label_filter(self, query):
        """The (key, value) pairs of a `labels.KEY = "VALUE" [AND …]` filter; None if invalid."""
        wanted = []
        text = query.get("filter", "").strip()
        if text:
            for clause in re.split(r"\s+AND\s+", text):
                m = LABEL_FILTER_RE.match(clause.strip("() "))
                if not m:
                    return None
                wanted.append((m.group(1), m.group(2)))
        return wanted

    def page_of(self, matching, query):
        """One page of `matching` and the token of the next (None on the last page)."""
        page_size = min(int(query.get("maxResults") or 500), 500)
        token = query.get("pageToken", "")
        start = int(token) if token.isdigit() else 0
        page = matching[start:start + page_size]
        following = str(start + page_size) if start + page_size < len(matching) else None
        return page, following

    def aggregated(self, project, query):
        s = self.state
        wanted = self.label_filter(query)
        if wanted is None or (query.get("pageToken") and not query["pageToken"].isdigit()):
            return self.reply(400, google_error(400, "Invalid list filter or page token.", "INVALID_ARGUMENT", "invalid"))
        for op in list(s.operations.values()):
            op.settle()
        matching = [
            (z, i) for (p, z, _), i in sorted(s.instances.items())
            if p == project and all((i.get("labels") or {}).get(k) == v for k, v in wanted)
        ]
        page, following = self.page_of(matching, query)
        items = {}
        for zone, instance in page:
            items.setdefault("zones/" + zone, {"instances": []})["instances"].append(instance)
        # Like GCE: scopes without results carry a warning instead of instances.
        items.setdefault("regions/us-central1", {"warning": {
            "code": "NO_RESULTS_ON_PAGE",
            "message": "There are no results for scope 'regions/us-central1' on this page.",
            "data": [{"key": "scope", "value": "regions/us-central1"}]}})
        out = {
            "kind": "compute#instanceAggregatedList",
            "id": "projects/%s/aggregated/instances" % project,
            "items": items,
            "selfLink": "https://www.googleapis.com/compute/v1/projects/%s/aggregated/instances" % project,
        }
        if following:
            out["nextPageToken"] = following
        self.reply(200, out)

    def list(self, project, zone, query):
        s = self.state
        wanted = self.label_filter(query)
        if wanted is None or (query.get("pageToken") and not query["pageToken"].isdigit()):
            return self.reply(400, google_error(400, "Invalid list filter or page token.", "INVALID_ARGUMENT", "invalid"))
        for op in list(s.operations.values()):
            op.settle()
        matching = [
            i for (p, z, _), i in sorted(s.instances.items())
            if p == project and z == zone
            and all((i.get("labels") or {}).get(k) == v for k, v in wanted)
        ]
        page, following = self.page_of(matching, query)
        out = {
            "kind": "compute#instanceList",
            "id": "projects/%s/zones/%s/instances" % (project, zone),
            "items": page,
            "selfLink": "https://www.googleapis.com/compute/v1/projects/%s/zones/%s/instances" % (project, zone),
        }
        if following:
            out["nextPageToken"] = following
        self.reply(200, out)

    def get(self, key):
        s = self.state
        for op in list(s.operations.values()):
            op.settle()
        if key not in s.instances:
            return self.reply(404, google_error(404, "The resource was not found", "NOT_FOUND", "notFound"))
        out = json.loads(json.dumps(s.instances[key]))
        if key[2] in s.races:
            # Another writer changes the metadata right after this read.
            s.races.discard(key[2])
            md = s.instances[key]["metadata"]
            md.setdefault("items", []).append({"key": "other-writer", "value": "was here"})
            md["fingerprint"] = fingerprint()
        self.reply(200, out)

    def delete(self, key, op_error):
        s = self.state
        s.instances[key]["status"] = "STOPPING"

        def effect(error):
            if error:
                if key in s.instances:
                    s.instances[key]["status"] = "RUNNING"
            else:
                s.instances.pop(key, None)
                s.guest_attributes.pop(key, None)

        self.start(key[0], key[1], "delete", key[2], effect, op_error)

    def set_metadata(self, key, body, op_error):
        s = self.state
        md = s.instances[key]["metadata"]
        if not isinstance(body, dict) or body.get("fingerprint") != md.get("fingerprint"):
            return self.reply(412, google_error(
                412, "Supplied fingerprint does not match current metadata fingerprint.",
                "FAILED_PRECONDITION", "conditionNotMet"))
        items = body.get("items") or []

        def effect(error):
            if not error and key in s.instances:
                s.instances[key]["metadata"] = {
                    "kind": "compute#metadata",
                    "fingerprint": fingerprint(),
                    "items": items,
                }

        # The fingerprint changes when the write is accepted, as on GCE.
        md["fingerprint"] = fingerprint()
        self.start(key[0], key[1], "setMetadata", key[2], effect, op_error)

    def guest(self, key, query):
        s = self.state
        path = query.get("queryPath", "")
        items = [
            e for e in s.guest_attributes.get(key, [])
            if ("%s/%s" % (e["namespace"], e["key"])).startswith(path)
        ]
        if not items:
            return self.reply(404, google_error(
                404, "The resource 'projects/%s/zones/%s/instances/%s/guestAttributes/%s' was not found"
                % (key + (path,)), "NOT_FOUND", "notFound"))
        self.reply(200, {
            "kind": "compute#guestAttributes",
            "queryPath": path,
            "queryValue": {"items": items},
            "selfLink": "https://www.googleapis.com/compute/v1/projects/%s/zones/%s/instances/%s/guestAttributes/%s" % (key + (path,)),
        })


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--operation-delay", type=float, default=0.3)
    ap.add_argument("--service-account-public")
    args = ap.parse_args()
    account = None
    if args.service_account_public:
        with open(args.service_account_public) as f:
            account = json.load(f)
    Handler.state = State(args.operation_delay, account)
    serve(Handler)


if __name__ == "__main__":
    main()
