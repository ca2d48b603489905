#!/usr/bin/env python3
"""A Web Push receiver for tests: a push service and its browser in one, written apart from the sender.

It checks what Courier's Rust sender makes with other people's code: the
payload is decrypted by `http_ece` (RFC 8188 aes128gcm, keyed as RFC 8291
says) with a key pair and auth secret made here, and the VAPID token
(RFC 8292) is verified with `cryptography`.

    python scripts/webpush-receiver.py [--timeout SECONDS]

Once it listens (on 127.0.0.1, a free port) it prints one JSON line on
stdout, the subscription:

    {"endpoint": "http://127.0.0.1:PORT/push/", "p256dh": "...", "auth": "..."}

A test appends a name to the endpoint. It serves:

    POST /push/NAME   checks and records the request, then answers like a
                      push service: 401 if the VAPID token is bad, else by
                      the name's prefix: gone-* 410, fail-* 500, forbid-* 403
                      (what push services answer to a VAPID key that is not
                      the subscription's), hang-* no answer at all (the
                      socket is held), anything else 201
    GET /received     the records, a JSON list of {name, status, headers,
                      payload, vapid, ok, error}

It stops when its stdin closes (the test that spawned it ended, however it
ended) or after --timeout seconds.
"""

import argparse
import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import http_ece
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# What a push service accepts: RFC 8030 leaves the size to it; 4096 bytes is the common bound.
MAX_BODY = 4096
# RFC 8292 §2: exp no more than 24 hours after the request; a little slack for clocks.
MAX_EXP_AHEAD = 24 * 60 * 60 + 60
HEADERS_OF_INTEREST = ("ttl", "urgency", "topic", "content-encoding", "content-type", "content-length")


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def verify_vapid(authorization, audience):
    """The claims of a valid `vapid t=JWT, k=KEY` header, else raises ValueError saying why."""
    if not authorization or not authorization.startswith("vapid "):
        raise ValueError("no vapid Authorization header")
    params = {}
    for part in authorization[len("vapid ") :].split(","):
        name, _, value = part.strip().partition("=")
        params[name] = value
    token, key = params.get("t"), params.get("k")
    if not token or not key:
        raise ValueError("the vapid header lacks t= or k=")
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(key))

    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("t= is not a JWS compact serialization")
    header = json.loads(b64url_decode(parts[0]))
    if header.get("alg") != "ES256":
        raise ValueError(f"alg is {header.get('alg')!r}, not ES256")
    signature = b64url_decode(parts[2])
    if len(signature) != 64:
        raise ValueError("an ES256 signature is 64 bytes (r || s)")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("the JWT signature does not verify with k=") from None

    claims = json.loads(b64url_decode(parts[1]))
    if claims.get("aud") != audience:
        raise ValueError(f"aud is {claims.get('aud')!r}, not the endpoint's origin {audience!r}")
    exp, now = claims.get("exp"), time.time()
    if not isinstance(exp, int) or exp <= now:
        raise ValueError("exp is missing or past")
    if exp > now + MAX_EXP_AHEAD:
        raise ValueError("exp is more than 24 hours ahead")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.startswith(("mailto:", "https:")):
        raise ValueError("sub is not a mailto: or https: contact")
    return {"claims": claims, "k": key}


class Receiver:
    def __init__(self):
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        self.records = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.origin = None

    def subscription(self, port):
        public = self.private_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return {
            "endpoint": f"http://127.0.0.1:{port}/push/",
            "p256dh": b64url_encode(public),
            "auth": b64url_encode(self.auth),
        }

    def receive(self, name, headers, body):
        """Checks one push request; returns its record (status still to set)."""
        record = {
            "name": name,
            "status": None,
            "headers": {h: headers.get(h) for h in HEADERS_OF_INTEREST if headers.get(h) is not None},
            "payload": None,
            "vapid": None,
            "ok": False,
            "error": None,
        }
        errors = []
        try:
            record["vapid"] = verify_vapid(headers.get("authorization"), self.origin)
        except Exception as e:  # any malformed header is a finding, not a crash
            errors.append(f"vapid: {e}")
        if headers.get("content-encoding") != "aes128gcm":
            errors.append("Content-Encoding is not aes128gcm")
        try:
            plain = http_ece.decrypt(body, private_key=self.private_key, auth_secret=self.auth, version="aes128gcm")
            record["payload"] = plain.decode("utf-8")
        except Exception as e:
            errors.append(f"decrypt: {type(e).__name__}: {e}")
        record["ok"] = not errors
        record["error"] = "; ".join(errors) or None
        return record

    def stop(self, server):
        self.stopping.set()
        server.shutdown()


def make_handler(receiver):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # the test's output stays the test's
            pass

        def answer(self, status, body=b"", content_type="application/json", extra=()):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/received":
                return self.answer(404)
            with receiver.lock:
                body = json.dumps(receiver.records).encode("utf-8")
            self.answer(200, body)

        def do_POST(self):
            if not self.path.startswith("/push/"):
                return self.answer(404)
            name = self.path[len("/push/") :]
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self.answer(413)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            record = receiver.receive(name, headers, body)

            if record["vapid"] is None:
                status = 401
            elif name.startswith("gone-"):
                status = 410
            elif name.startswith("fail-"):
                status = 500
            elif name.startswith("forbid-"):
                status = 403
            elif name.startswith("hang-"):
                status = None
            else:
                status = 201
            record["status"] = status
            with receiver.lock:
                receiver.records.append(record)
            if status is None:
                # Hold the socket, unanswered, until the receiver stops.
                receiver.stopping.wait()
                self.close_connection = True
                return
            # RFC 8030 §5: a push service answers 201 with the message's Location.
            extra = [("Location", f"/message/{len(receiver.records)}")] if status == 201 else []
            self.answer(status, extra=extra)

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600, help="stop after this many seconds (default 600)")
    args = parser.parse_args()

    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(receiver))
    server.daemon_threads = True
    port = server.server_address[1]
    receiver.origin = f"http://127.0.0.1:{port}"

    def watch_stdin():
        while sys.stdin.buffer.read(4096):
            pass
        receiver.stop(server)

    threading.Thread(target=watch_stdin, daemon=True).start()
    timer = threading.Timer(args.timeout, receiver.stop, args=(server,))
    timer.daemon = True
    timer.start()

    print(json.dumps(receiver.subscription(port)), flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
