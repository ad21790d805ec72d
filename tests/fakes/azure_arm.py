#!/usr/bin/env python3
"""A small Azure Resource Manager server for the Azure driver's tests, over HTTPS.

It speaks ARM's documented JSON for Microsoft.Network/networkInterfaces,
Microsoft.Compute/virtualMachines and Microsoft.Compute/disks in the resource groups it is
given: PUT (201 + Azure-AsyncOperation; provisioningState Creating, then Succeeded after the
operation delay), GET, list with nextLink, PATCH of tags, DELETE (202 + Location), with each
api-version checked. It also serves Entra ID's client-credentials token endpoint, which checks
the client secret; every ARM call must carry one of its bearer tokens.

Test-only controls live under /fake/: injected errors, a request log, every resource, orphans
of a given age, settings (page size, the delay before a NIC gets its IP). Standard library only.

Usage: azure_arm.py --cert PEM --key PEM [--operation-delay S] [--nic-ip-delay S]
Prints "listening on https://127.0.0.1:PORT" and "control on http://127.0.0.1:PORT" (the
/fake/ controls without TLS) once ready; exits when its stdin closes.
"""

import argparse
import json
import re
import secrets
import threading
import time
import urllib.parse

from fakelib import FakeHandler, serve

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
TENANT = "11111111-1111-1111-1111-111111111111"
CLIENT_ID = "22222222-2222-2222-2222-222222222222"
CLIENT_SECRET = "fake-client-secret"
RESOURCE_GROUPS = {"batch", "images", "network"}
API_VERSIONS = {
    "Microsoft.Network/networkInterfaces": "2024-05-01",
    "Microsoft.Compute/virtualMachines": "2024-07-01",
    "Microsoft.Compute/disks": "2024-03-02",
}
SUBNET = "/subscriptions/%s/resourceGroups/network/providers/Microsoft.Network/virtualNetworks/vnet/subnets/workers" % SUBSCRIPTION
IMAGE = "/subscriptions/%s/resourceGroups/images/providers/Microsoft.Compute/images/worker-image" % SUBSCRIPTION


def arm_error(code, message, details=None):
    body = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


def rfc3339(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".0000000+00:00"


class State:
    def __init__(self, operation_delay, nic_ip_delay):
        self.lock = threading.Condition()
        self.operation_delay = operation_delay
        self.nic_ip_delay = nic_ip_delay
        self.page_size = 50
        self.tokens = set()
        self.resources = {}  # lowercased ID -> resource dict (with private "_" keys)
        self.operations = {}  # op id -> Operation
        self.injected = []
        self.requests = []
        self.next_ip = 4


class Operation:
    """An ARM long-running operation: InProgress until the delay passes, then `effect` runs
    once and the status is Succeeded, or Failed with `error`."""

    def __init__(self, state, effect, error=None):
        self.id = secrets.token_hex(8)
        self.started = time.monotonic()
        self.delay = state.operation_delay
        self.effect, self.error, self.applied = effect, error, False

    def done(self):
        return time.monotonic() - self.started >= self.delay

    def settle(self):
        if self.done() and not self.applied:
            self.applied = True
            if self.effect:
                self.effect(self.error)

    def status(self):
        self.settle()
        if not self.done():
            return {"status": "InProgress", "name": self.id}
        if self.error:
            return {"status": "Failed", "name": self.id, "error": self.error}
        return {"status": "Succeeded", "name": self.id}


class Handler(FakeHandler):
    state = None
    base = None  # https://127.0.0.1:PORT

    def route(self, method):
        self.entry = None
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            if url.path == "/%s/oauth2/v2.0/token" % TENANT and method == "POST":
                return self.token(raw)
            if url.path.startswith("/fake/"):
                return self.control(method, url.path, raw)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            auth = self.headers.get("Authorization", "")
            s = self.state
            with s.lock:
                authorized = auth.startswith("Bearer ") and auth[7:] in s.tokens
                self.entry = {"method": method, "path": url.path, "query": query,
                              "body": body, "authorized": authorized, "status": None}
                s.requests.append(self.entry)
                if not authorized:
                    return self.reply(401, arm_error(
                        "InvalidAuthenticationToken",
                        "The access token is invalid."), {"WWW-Authenticate": 'Bearer error="invalid_token"'})
                fault = self.injected_for(method, url.path)
                if fault and "respond" in fault:
                    r = fault["respond"]
                    return self.reply(r["status"], r.get("body"), r.get("headers"))
                return self.arm(method, url.path, query, body, fault)
        except Exception as e:  # a bug here must show in the test, not hang it
            self.reply(500, arm_error("FakeServerError", repr(e)))

    # ---- Entra ID ---------------------------------------------------------------------------

    def token(self, raw):
        form = dict(urllib.parse.parse_qsl(raw.decode()))
        if form.get("grant_type") != "client_credentials" or form.get("client_id") != CLIENT_ID \
                or form.get("client_secret") != CLIENT_SECRET:
            return self.reply(401, {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                "error_codes": [7000215],
            })
        token = "eyJ0eXAiOiJKV1Qi.fake." + secrets.token_urlsafe(24)
        with self.state.lock:
            self.state.tokens.add(token)
        self.reply(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                         "access_token": token})

    # ---- test controls ----------------------------------------------------------------------

    def control(self, method, path, raw):
        s = self.state
        arg = json.loads(raw) if raw else {}
        self.entry = None
        with s.lock:
            for op in list(s.operations.values()):
                op.settle()
            if path == "/fake/requests":
                return self.reply(200, s.requests)
            if path == "/fake/inject":
                arg.setdefault("times", 1)
                s.injected.append(arg)
                return self.reply(200, {})
            if path == "/fake/resources":
                return self.reply(200, [self.public(r) for r in s.resources.values()])
            if path == "/fake/config":
                if "page_size" in arg:
                    s.page_size = int(arg["page_size"])
                if "nic_ip_delay" in arg:
                    s.nic_ip_delay = float(arg["nic_ip_delay"])
                return self.reply(200, {})
            if path == "/fake/orphan":
                # A NIC or disk of a set with no VM, created `age` seconds ago.
                kind = arg["kind"]
                rg = arg.get("resource_group", "batch")
                provider = {"nic": "Microsoft.Network/networkInterfaces", "disk": "Microsoft.Compute/disks"}[kind]
                rid = "/subscriptions/%s/resourceGroups/%s/providers/%s/%s" % (SUBSCRIPTION, rg, provider, arg["name"])
                created = time.time() - float(arg["age"])
                tags = dict(arg.get("tags") or {})
                if kind == "nic":
                    props = {"provisioningState": "Succeeded", "ipConfigurations": [{"name": "ipconfig1", "properties": {
                        "privateIPAddress": "10.0.9.9", "privateIPAllocationMethod": "Dynamic", "subnet": {"id": SUBNET}}}]}
                else:
                    props = {"provisioningState": "Succeeded", "diskState": "Unattached", "diskSizeGB": 30,
                             "timeCreated": rfc3339(created)}
                s.resources[rid.lower()] = {"id": rid, "name": arg["name"], "type": provider, "location": "eastus",
                                            "tags": tags, "properties": props, "_created": created}
                return self.reply(200, {})
        self.reply(404, {"error": "no such control"})

    # ---- ARM --------------------------------------------------------------------------------

    def public(self, r):
        out = {k: v for k, v in r.items() if not k.startswith("_")}
        if r.get("type") == "Microsoft.Network/networkInterfaces" and "_ip_at" in r:
            # The private IP shows only once allocated.
            ipc = json.loads(json.dumps(out["properties"]["ipConfigurations"]))
            if time.monotonic() < r["_ip_at"]:
                for c in ipc:
                    c["properties"].pop("privateIPAddress", None)
            out["properties"] = dict(out["properties"], ipConfigurations=ipc)
        return out

    def start(self, effect, error=None, location_style=False, status=201, body=None):
        s = self.state
        op = Operation(s, effect, error)
        s.operations[op.id] = op
        url = "%s/subscriptions/%s/providers/Microsoft.Compute/locations/eastus/operations/%s" % (self.base, SUBSCRIPTION, op.id)
        if location_style:
            return self.reply(202, None, {"Location": url + "?api-version=2024-07-01&monitor=true"})
        return self.reply(status, body, {"Azure-AsyncOperation": url + "?api-version=2024-07-01"})

    def arm(self, method, path, query, body, fault):
        s = self.state
        for op in list(s.operations.values()):
            op.settle()
        m = re.match(r"^/subscriptions/([^/]+)/providers/Microsoft.Compute/locations/[^/]+/operations/([^/]+)$", path)
        if m and method == "GET":
            op = s.operations.get(m.group(2))
            if op is None:
                return self.reply(404, arm_error("NotFound", "operation not found"))
            if query.get("monitor") == "true":
                st = op.status()
                if st["status"] == "InProgress":
                    return self.reply(202, None, {"Location": self.base + self.path})
                if st["status"] == "Failed":
                    return self.reply(400, {"error": st["error"]})
                return self.reply(200, None)
            return self.reply(200, op.status())
        m = re.match(r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/(Microsoft\.[A-Za-z]+/[A-Za-z]+)(?:/([^/]+))?$", path)
        if not m:
            return self.reply(404, arm_error("InvalidResourceType", "no such resource type: %s" % path))
        sub, rg, provider, name = m.groups()
        if sub != SUBSCRIPTION:
            return self.reply(404, arm_error("SubscriptionNotFound", "The subscription '%s' could not be found." % sub))
        if rg not in RESOURCE_GROUPS:
            return self.reply(404, arm_error("ResourceGroupNotFound", "Resource group '%s' could not be found." % rg))
        if provider not in API_VERSIONS:
            return self.reply(404, arm_error("InvalidResourceType", "The resource type '%s' could not be found." % provider))
        want = API_VERSIONS[provider]
        if query.get("api-version") != want and "$skiptoken" not in query:
            return self.reply(400, arm_error(
                "InvalidApiVersionParameter" if "api-version" in query else "MissingApiVersionParameter",
                "The api-version '%s' is invalid. The supported versions are '%s'." % (query.get("api-version"), want)))
        collection = "/subscriptions/%s/resourceGroups/%s/providers/%s" % (sub, rg, provider)
        if name is None:
            if method != "GET":
                return self.reply(405, arm_error("MethodNotAllowed", method))
            return self.list(collection, query)
        rid = "%s/%s" % (collection, name)
        key = rid.lower()
        existing = s.resources.get(key)
        error = fault.get("async_error") if fault else None
        if method == "GET":
            if not existing:
                return self.reply(404, arm_error("ResourceNotFound", "The Resource '%s/%s' under resource group '%s' was not found." % (provider, name, rg)))
            return self.reply(200, self.public(existing))
        if method == "DELETE":
            if not existing:
                return self.reply(204, None)
            return self.delete(key, error)
        if method == "PATCH":
            if not existing:
                return self.reply(404, arm_error("ResourceNotFound", "The Resource '%s/%s' under resource group '%s' was not found." % (provider, name, rg)))
            tags = (body or {}).get("tags")
            if not isinstance(tags, dict):
                return self.reply(400, arm_error("InvalidRequestContent", "PATCH here only takes tags."))

            def effect(err):
                if not err and key in s.resources:
                    s.resources[key]["tags"] = tags

            return self.start(effect, error, status=200, body=self.public(existing))
        if method == "PUT":
            if provider == "Microsoft.Network/networkInterfaces":
                return self.put_nic(rid, name, body, error)
            if provider == "Microsoft.Compute/virtualMachines":
                return self.put_vm(rid, name, rg, body, error)
        self.reply(405, arm_error("MethodNotAllowed", "%s %s" % (method, provider)))

    def list(self, collection, query):
        s = self.state
        items = sorted((r for k, r in s.resources.items() if k.startswith(collection.lower() + "/")),
                       key=lambda r: r["name"])
        start = int(query.get("$skiptoken") or 0)
        page = items[start:start + s.page_size]
        out = {"value": [self.public(r) for r in page]}
        if start + s.page_size < len(items):
            out["nextLink"] = "%s%s?api-version=%s&$skiptoken=%d" % (
                self.base, collection, API_VERSIONS[collection.split("/providers/")[1]], start + s.page_size)
        self.reply(200, out)

    def check_location_and_tags(self, body):
        if not isinstance(body, dict) or not body.get("location"):
            return arm_error("LocationRequired", "The location property is required for this definition.")
        for k in (body.get("tags") or {}):
            if len(k) > 512 or re.search(r"[<>%&\\?/]", k):
                return arm_error("InvalidTagNameCharacters", "The tag names '%s' have reserved characters '<,>,%%,&,\\,?,/' or control characters." % k)
        return None

    def put_nic(self, rid, name, body, error):
        s = self.state
        problem = self.check_location_and_tags(body)
        if problem:
            return self.reply(400, problem)
        configs = (body.get("properties") or {}).get("ipConfigurations") or []
        subnet = ((configs[0].get("properties") or {}).get("subnet") or {}).get("id") if configs else None
        if subnet != SUBNET:
            return self.reply(400, arm_error("InvalidResourceReference",
                "Resource %s referenced by resource %s was not found. Please make sure that the referenced resource exists, and that both resources are in the same region." % (subnet, rid)))
        if configs[0]["properties"].get("publicIPAddress"):
            return self.reply(400, arm_error("InvalidRequest", "this fake takes no public IPs"))
        s.next_ip += 1
        ip = "10.0.%d.%d" % (s.next_ip // 250, s.next_ip % 250 + 4)
        nic = {
            "id": rid, "name": name, "type": "Microsoft.Network/networkInterfaces",
            "location": body["location"], "tags": body.get("tags") or {},
            "etag": 'W/"%s"' % secrets.token_hex(8),
            "properties": {
                "provisioningState": "Updating",
                "ipConfigurations": [{"name": configs[0].get("name", "ipconfig1"), "properties": dict(
                    configs[0]["properties"], privateIPAddress=ip, provisioningState="Succeeded")}],
            },
            "_created": time.time(), "_ip_at": time.monotonic() + s.nic_ip_delay,
        }
        s.resources[rid.lower()] = nic

        def effect(err):
            if err:
                nic["properties"]["provisioningState"] = "Failed"
            else:
                nic["properties"]["provisioningState"] = "Succeeded"

        self.start(effect, error, body=self.public(nic))

    def put_vm(self, rid, name, rg, body, error):
        s = self.state
        problem = self.check_location_and_tags(body)
        if problem:
            return self.reply(400, problem)
        props = body.get("properties") or {}
        nics = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        nic = s.resources.get((nics[0].get("id") or "").lower()) if nics else None
        if nic is None:
            return self.reply(400, arm_error("InvalidParameter", "The network interface of the VM was not found.",
                                             [{"code": "NotFound", "target": "networkProfile"}]))
        image = ((props.get("storageProfile") or {}).get("imageReference") or {})
        if "id" in image and image["id"].lower() != IMAGE.lower():
            return self.reply(404, arm_error("NotFound", "The Image '%s' cannot be found in 'eastus' region." % image["id"]))
        os_profile = props.get("osProfile") or {}
        linux = os_profile.get("linuxConfiguration") or {}
        if not linux.get("disablePasswordAuthentication") and not os_profile.get("adminPassword"):
            return self.reply(400, arm_error("InvalidParameter", "Required parameter 'adminPassword' is missing (null)."))
        vm = {
            "id": rid, "name": name, "type": "Microsoft.Compute/virtualMachines",
            "location": body["location"], "tags": body.get("tags") or {},
            "properties": dict(json.loads(json.dumps(props)), provisioningState="Creating",
                               vmId=secrets.token_hex(16)),
        }
        # The VM's disks, as ARM creates them: attached, untagged.
        storage = vm["properties"].setdefault("storageProfile", {})
        disks = [storage.get("osDisk") or {}] + list(storage.get("dataDisks") or [])
        disk_ids = []
        for d in disks:
            dname = d.get("name") or "%s_OsDisk_%s" % (name, secrets.token_hex(6))
            did = "/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Compute/disks/%s" % (SUBSCRIPTION, rg, dname)
            s.resources[did.lower()] = {
                "id": did, "name": dname, "type": "Microsoft.Compute/disks", "location": body["location"],
                "managedBy": rid, "tags": {},
                "properties": {"provisioningState": "Succeeded", "diskState": "Attached",
                               "diskSizeGB": d.get("diskSizeGB") or 30, "timeCreated": rfc3339(time.time())},
                "_delete_with_vm": d.get("deleteOption") == "Delete",
            }
            d.setdefault("managedDisk", {})["id"] = did
            disk_ids.append(did.lower())
        nic["properties"]["virtualMachine"] = {"id": rid}
        nic["_delete_with_vm"] = (nics[0].get("properties") or {}).get("deleteOption") == "Delete"
        vm["_disks"] = disk_ids
        vm["_nic"] = nic["id"].lower()
        s.resources[rid.lower()] = vm

        def effect(err):
            vm["properties"]["provisioningState"] = "Failed" if err else "Succeeded"

        self.start(effect, error, body=self.public(vm))

    def delete(self, key, error):
        s = self.state
        r = s.resources[key]
        if r["type"] == "Microsoft.Network/networkInterfaces" and (r["properties"].get("virtualMachine") or {}).get("id", "").lower() in s.resources:
            return self.reply(400, arm_error("NicInUse", "Network Interface %s is used by existing resource %s. In order to delete the network interface, it must be dissociated from the resource." % (r["id"], r["properties"]["virtualMachine"]["id"])))
        if r["type"] == "Microsoft.Compute/virtualMachines":
            r["properties"]["provisioningState"] = "Deleting"

        def effect(err):
            if err:
                return
            gone = s.resources.pop(key, None)
            if gone and gone["type"] == "Microsoft.Compute/virtualMachines":
                nic = s.resources.get(gone.get("_nic", ""))
                if nic:
                    if nic.get("_delete_with_vm"):
                        s.resources.pop(gone["_nic"], None)
                    else:
                        nic["properties"].pop("virtualMachine", None)
                for d in gone.get("_disks", []):
                    disk = s.resources.get(d)
                    if disk and disk.get("_delete_with_vm"):
                        s.resources.pop(d, None)
                    elif disk:
                        disk["managedBy"] = None
                        disk["properties"]["diskState"] = "Unattached"

        self.start(effect, error, location_style=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--operation-delay", type=float, default=0.3)
    ap.add_argument("--nic-ip-delay", type=float, default=0.0)
    args = ap.parse_args()
    Handler.state = State(args.operation_delay, args.nic_ip_delay)
    serve(Handler, args.cert, args.key)

if __name__ == "__main__":
    main()
