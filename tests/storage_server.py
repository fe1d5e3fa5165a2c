"""A local server that answers as Supabase Storage's documented HTTP API does, for the parts
the service uses through supabase-py: multipart upload with x-upsert, buckets (get, create),
signed URLs (one, or several at once) and fetching an object by its public, authenticated or
signed URL. Signed URLs carry an HS256 token with the object and an expiry, as Storage's do.
Like Storage, it reports most failures as HTTP 400 with the real status in "statusCode".
`script` replaces the next answers (status, body) to play outages and odd replies.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import jwt

KEY = "sb_secret_ServiceRoleKeyThatMustNeverBeLogged0123456789"
PREFIX = "/storage/v1"


class StorageServer:
    def __init__(self, key: str = KEY) -> None:
        self.key = key
        self.secret = uuid.uuid4().hex  # signs the signed URLs' tokens
        self.requests: list[dict[str, Any]] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.buckets: dict[str, bool] = {"outputs": True}  # id -> public
        self.script: deque[tuple[int, dict]] = deque()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"owner": self}))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def sign(self, bucket: str, path: str, seconds: int) -> str:
        now = int(time.time())
        token = jwt.encode({"url": f"{bucket}/{path}", "iat": now, "exp": now + seconds}, self.secret,
                           algorithm="HS256")
        return f"/object/sign/{bucket}/{quote(path)}?token={token}"


class _Handler(BaseHTTPRequestHandler):
    owner: StorageServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # --- requests --------------------------------------------------------------------------

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.record("POST", body)
        if self.owner.script:
            return self.answer(*self.owner.script.popleft())
        if not self.authorised():
            return self.error(403, "Unauthorized", "invalid signature")
        route = urlsplit(self.path).path.removeprefix(PREFIX)
        if route == "/bucket":
            return self.create_bucket(json.loads(body))
        if route.startswith("/object/sign/"):
            return self.sign(unquote(route.removeprefix("/object/sign/")), json.loads(body))
        if route.startswith("/object/"):
            bucket, _, path = unquote(route.removeprefix("/object/")).partition("/")
            return self.upload(bucket, path, body)
        self.error(404, "not_found", "route not found")

    def do_GET(self) -> None:
        self.record("GET", b"")
        if self.owner.script:
            return self.answer(*self.owner.script.popleft())
        parts = urlsplit(self.path)
        route = parts.path.removeprefix(PREFIX)
        if route.startswith("/bucket/"):
            return self.get_bucket(unquote(route.removeprefix("/bucket/")))
        kind, _, rest = route.removeprefix("/object/").partition("/")
        bucket, _, path = unquote(rest).partition("/")
        if kind == "public" and self.owner.buckets.get(bucket):
            return self.serve(bucket, path)
        if kind == "authenticated" and self.authorised():
            return self.serve(bucket, path)
        if kind == "sign":
            return self.signed(bucket, path, parse_qs(parts.query).get("token", [""])[0])
        self.error(400 if kind == "public" else 403, "not_found", "Object not found")

    # --- answers ---------------------------------------------------------------------------

    def upload(self, bucket: str, path: str, body: bytes) -> None:
        if bucket not in self.owner.buckets:
            return self.error(404, "Bucket not found", "Bucket not found")
        if (bucket, path) in self.owner.objects and self.headers.get("x-upsert") != "true":
            return self.error(409, "Duplicate", "The resource already exists")
        fields = self.form(body)
        data, content_type = fields["file"]
        seconds = fields["cacheControl"][0].decode()
        self.owner.objects[(bucket, path)] = {"body": data, "content_type": content_type,
                                              "cache_control": f"max-age={seconds}"}
        self.answer(200, {"Key": f"{bucket}/{path}", "Id": str(uuid.uuid4())})

    def form(self, body: bytes) -> dict[str, tuple[bytes, str]]:
        """multipart/form-data fields: name -> (bytes, content type)."""
        header = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(header + body)
        return {part.get_param("name", header="content-disposition"):
                (part.get_payload(decode=True), part.get_content_type()) for part in message.iter_parts()}

    def get_bucket(self, bucket: str) -> None:
        if bucket not in self.owner.buckets:
            return self.error(404, "Bucket not found", "Bucket not found")
        now = "2026-01-01T00:00:00.000Z"
        self.answer(200, {"id": bucket, "name": bucket, "owner": "", "public": self.owner.buckets[bucket],
                          "created_at": now, "updated_at": now, "file_size_limit": None,
                          "allowed_mime_types": None})

    def create_bucket(self, body: dict) -> None:
        if body["id"] in self.owner.buckets:
            return self.error(409, "Duplicate", "The resource already exists")
        self.owner.buckets[body["id"]] = bool(body.get("public"))
        self.answer(200, {"name": body["id"]})

    def sign(self, target: str, body: dict) -> None:
        bucket, _, path = target.partition("/")
        seconds = int(body["expiresIn"])
        if path:  # one object
            if (bucket, path) not in self.owner.objects:
                return self.error(404, "not_found", "Object not found")
            return self.answer(200, {"signedURL": self.owner.sign(bucket, path, seconds)})
        missing = "Either the object does not exist or you do not have access to it"
        self.answer(200, [
            {"path": p, "error": None, "signedURL": self.owner.sign(bucket, p, seconds)}
            if (bucket, p) in self.owner.objects else {"path": p, "error": missing, "signedURL": None}
            for p in body["paths"]])

    def signed(self, bucket: str, path: str, token: str) -> None:
        try:
            claims = jwt.decode(token, self.owner.secret, algorithms=["HS256"])
        except jwt.ExpiredSignatureError:
            return self.error(400, "InvalidJWT", "jwt expired")
        except jwt.InvalidTokenError:
            return self.error(400, "InvalidJWT", "invalid signature")
        if claims["url"] != f"{bucket}/{path}":
            return self.error(400, "InvalidSignature", "The url do not match the signature")
        self.serve(bucket, path)

    def serve(self, bucket: str, path: str) -> None:
        stored = self.owner.objects.get((bucket, path))
        if stored is None:
            return self.error(404, "not_found", "Object not found")
        self.send_response(200)
        self.send_header("Content-Type", stored["content_type"])
        self.send_header("Content-Length", str(len(stored["body"])))
        self.end_headers()
        self.wfile.write(stored["body"])

    def authorised(self) -> bool:
        key = self.owner.key
        return self.headers.get("Authorization") == f"Bearer {key}" and self.headers.get("apikey") == key

    def record(self, method: str, body: bytes) -> None:
        self.owner.requests.append({"method": method, "path": self.path, "body": body,
                                    "headers": {k.lower(): v for k, v in self.headers.items()}})

    def error(self, status: int, error: str, message: str) -> None:
        self.answer(400, {"statusCode": str(status), "error": error, "message": message})

    def answer(self, status: int, body: dict | list) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
