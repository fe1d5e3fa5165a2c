"""A local Supabase for the follower's tests: the parts of a project supabase-py talks to,
answering as their documented APIs do, over one base URL like a project's.

- Auth (GoTrue): POST /auth/v1/token?grant_type=password gives a session whose access token
  is an HS256 JWT (sub, role, aud "authenticated", exp, iss) signed with the project's secret.
- PostgREST: GET /rest/v1/<table>?select=a,b&col=eq.value, run on the Supabase-shaped
  database (tests/supabase.py) as PostgREST runs a request: SET LOCAL ROLE authenticated (anon
  without a token) and the token's claims in request.jwt.claims, so row-level security decides.
- Realtime: /realtime/v1/websocket speaks the Phoenix channel protocol (vsn 1.0.0: JSON
  objects with topic, event, payload, ref): heartbeat, phx_join with the access token,
  access_token, phx_leave. A private channel is authorised as Realtime authorises one: a probe
  row is inserted into realtime.messages for the topic and read back as the user under
  row-level security, in a transaction that is rolled back. Joined, a channel receives each
  row the database writes to realtime.messages for its topic (realtime.broadcast_changes, from
  our migrations' triggers) as a `broadcast` message.
- Postgres Changes, when started with `wal=True` (needs wal_level = logical and wal2json:
  tests/pg15.py): a join's config.postgres_changes bindings are answered with their ids and a
  `system` message ("Subscribed to PostgreSQL", or Realtime's error), then each change the
  WAL really holds reaches the subscribers Realtime would send it to, as a `postgres_changes`
  message {data: {schema, table, commit_timestamp, type, columns, record, old_record, errors},
  ids} (tests/realtime_changes.py: row-level security decides, per subscriber).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
import psycopg
import websockets
from websockets.asyncio.server import ServerConnection, serve

from service import db
from tests.realtime_changes import Binding, WalReader
from tests.supabase import acting_as

ANON_KEY = "sb_publishable_LocalProjectAnonKey0123456789"
_NAME = __import__("re").compile(r"[a-z_][a-z0-9_]*")


class SupabaseServer:
    def __init__(self, database_url: str, secret: str | None = None, wal: bool = False) -> None:
        self.database_url = database_url
        self.secret = secret or uuid.uuid4().hex * 2
        self.users: dict[str, tuple[str, str]] = {}  # email -> (password, user id)
        self.joins: list[dict[str, Any]] = []        # every phx_join, as received
        self.broadcasts: list[dict[str, Any]] = []   # every broadcast sent: topic and payload
        self.changes: list[dict[str, Any]] = []      # every postgres_changes sent: topic, payload
        self.sockets: set[_Socket] = set()
        self.wal = WalReader(database_url) if wal else None
        self.loop = asyncio.new_event_loop()
        self.ws_port = self._start_realtime()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Http,), {"owner": self}))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_user(self, email: str, password: str, user_id: str) -> None:
        self.users[email] = (password, user_id)

    def token_for(self, user_id: str, email: str = "", seconds: int = 3600) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "role": "authenticated", "aud": "authenticated", "email": email,
                  "iat": now, "exp": now + seconds, "iss": f"{self.url}/auth/v1"}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def claims(self, token: str) -> dict[str, Any]:
        """The claims of a valid access token (jwt.InvalidTokenError otherwise)."""
        return jwt.decode(token, self.secret, algorithms=["HS256"], audience="authenticated")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.call_soon_threadsafe(self._stop.set)
        self._stopped.wait(10)
        if self.wal:
            self.wal.close()

    def _start_realtime(self) -> int:
        started: list[int] = []
        ready = threading.Event()

        self._stopped = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            pumping = asyncio.create_task(self._pump()) if self.wal else None
            async with serve(lambda ws: _Socket(self, ws).run(), "127.0.0.1", 0) as server:
                started.append(server.sockets[0].getsockname()[1])
                ready.set()
                await self._stop.wait()
            if pumping:
                pumping.cancel()
                await asyncio.gather(pumping, return_exceptions=True)
            self._stopped.set()

        threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True).start()
        ready.wait(10)
        return started[0]


    async def _pump(self) -> None:
        """Read the WAL every 50 ms; send each change to the channels Realtime would send it to."""
        assert self.wal is not None
        while True:
            for change in await asyncio.to_thread(self.wal.changes):
                for sock in list(self.sockets):
                    await sock.send_change(change)
            await asyncio.sleep(0.05)


class _Http(BaseHTTPRequestHandler):
    owner: SupabaseServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        parts = urlsplit(self.path)
        if parts.path != "/auth/v1/token" or dict(parse_qsl(parts.query)).get("grant_type") != "password":
            return self.answer(404, {"message": "no route"})
        if self.headers.get("apikey") != ANON_KEY:
            return self.answer(401, {"message": "Invalid API key"})
        password, user_id = self.owner.users.get(body.get("email", ""), (None, None))
        if password is None or body.get("password") != password:
            return self.answer(400, {"code": 400, "error_code": "invalid_credentials",
                                     "msg": "Invalid login credentials"})
        self.answer(200, self.session(body["email"], user_id))

    def session(self, email: str, user_id: str) -> dict[str, Any]:
        now = "2026-01-01T00:00:00Z"
        return {"access_token": self.owner.token_for(user_id, email), "token_type": "bearer",
                "expires_in": 3600, "expires_at": int(time.time()) + 3600, "refresh_token": uuid.uuid4().hex,
                "user": {"id": user_id, "aud": "authenticated", "role": "authenticated", "email": email,
                         "app_metadata": {"provider": "email"}, "user_metadata": {}, "created_at": now}}

    def do_GET(self) -> None:
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.pipe_to_realtime()
        parts = urlsplit(self.path)
        if not parts.path.startswith("/rest/v1/"):
            return self.answer(404, {"message": "no route"})
        if self.headers.get("apikey") != ANON_KEY:
            return self.answer(401, {"message": "Invalid API key"})
        self.select(parts.path.removeprefix("/rest/v1/"), parse_qsl(parts.query))

    def select(self, table: str, query: list[tuple[str, str]]) -> None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            claims = self.owner.claims(token)
        except jwt.InvalidTokenError:
            claims = {"role": "anon"}  # the anon key itself: PostgREST runs as anon
        columns = [c for k, v in query if k == "select" for c in v.split(",")]
        filters = [(k, v.removeprefix("eq.")) for k, v in query if k != "select" and v.startswith("eq.")]
        if not all(_NAME.fullmatch(n) for n in [table, *columns, *(k for k, _ in filters)]):
            return self.answer(400, {"code": "PGRST100", "message": "unsupported query"})
        where = " AND ".join(f"{k} = %s" for k, _ in filters) or "true"
        sql = f"SELECT {', '.join(columns) or '*'} FROM {table} WHERE {where}"
        try:
            with db.connect(self.owner.database_url) as conn, acting_as(conn, claims["role"], claims):
                rows = conn.execute(sql, [v for _, v in filters]).fetchall()
        except psycopg.errors.InsufficientPrivilege as exc:
            return self.answer(401, {"code": "42501", "message": str(exc).splitlines()[0]})
        self.answer(200, rows)

    def pipe_to_realtime(self) -> None:
        """Hand the upgrade to the websocket server, byte for byte, both ways."""
        upstream = socket.create_connection(("127.0.0.1", self.owner.ws_port))
        head = self.requestline + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()) + "\r\n"
        upstream.sendall(head.encode())
        threading.Thread(target=_copy, args=(upstream, self.connection), daemon=True).start()
        _copy(self.connection, upstream)
        self.close_connection = True

    def answer(self, status: int, body: Any) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _copy(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, target):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Socket:
    """One client connection: its joined channels, and the messages sent to them."""

    def __init__(self, owner: SupabaseServer, ws: ServerConnection) -> None:
        self.owner, self.ws = owner, ws
        self.channels: dict[str, dict[str, Any]] = {}  # "realtime:job:<id>" -> {claims, after, sent}

    async def run(self) -> None:
        delivering = asyncio.create_task(self.deliver())
        self.owner.sockets.add(self)
        try:
            async for raw in self.ws:
                await self.handle(json.loads(raw))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.owner.sockets.discard(self)
            delivering.cancel()

    async def handle(self, message: dict[str, Any]) -> None:
        topic, event, ref = message["topic"], message["event"], message.get("ref")
        if event == "heartbeat":
            return await self.reply(topic, ref, "ok", {})
        if event == "phx_join":
            return await self.join(topic, message["payload"], ref)
        if event == "access_token" and topic in self.channels:
            self.channels[topic]["claims"] = self.owner.claims(message["payload"]["access_token"])
        elif event == "phx_leave":
            self.channels.pop(topic, None)
            await self.reply(topic, ref, "ok", {})

    async def join(self, topic: str, payload: dict[str, Any], ref: str | None) -> None:
        self.owner.joins.append({"topic": topic, "payload": payload})
        try:
            claims = self.owner.claims(payload.get("access_token") or "")
        except jwt.InvalidTokenError as exc:
            return await self.reply(topic, ref, "error", {"reason": f"InvalidJWTToken: {exc}"})
        name = topic.removeprefix("realtime:")
        config = payload.get("config", {})
        bindings = [Binding.from_join(spec) for spec in config.get("postgres_changes") or []]
        if bindings and self.owner.wal is None:
            return await self.reply(topic, ref, "error", {"reason": "this local server was started "
                                                          "without a WAL reader (wal=True)"})
        if config.get("private") and not await asyncio.to_thread(self.may_read, name, claims):
            reason = f"You do not have permissions to read from this Channel topic: {name}"
            return await self.reply(topic, ref, "error", {"reason": reason})
        after = await asyncio.to_thread(self.last_message_id)
        self.channels[topic] = {"name": name, "claims": claims, "after": after, "sent": set(),
                                "bindings": bindings}
        await self.reply(topic, ref, "ok", {"postgres_changes": [b.reply() for b in bindings]})
        if bindings:
            await self.start_changes(topic, name, bindings)

    async def start_changes(self, topic: str, name: str, bindings: list[Binding]) -> None:
        """Realtime's second answer to a join with bindings: subscribed, or why not (and none)."""
        assert self.owner.wal is not None
        problems = [p for b in bindings if (p := await asyncio.to_thread(self.owner.wal.refusal, b))]
        if problems:
            self.channels[topic]["bindings"] = []
        status, message = ("error", problems[0]) if problems else ("ok", "Subscribed to PostgreSQL")
        await self.send(topic, "system", {"channel": name, "extension": "postgres_changes",
                                          "message": message, "status": status})

    async def send_change(self, change: dict[str, Any]) -> None:
        assert self.owner.wal is not None
        for topic, channel in list(self.channels.items()):
            if not channel["bindings"]:
                continue
            payload = await asyncio.to_thread(self.owner.wal.message, change, channel["bindings"],
                                              channel["claims"])
            if payload is not None and topic in self.channels:
                await self.send(topic, "postgres_changes", payload)
                self.owner.changes.append({"topic": topic, "payload": payload})

    def may_read(self, topic: str, claims: dict[str, Any]) -> bool:
        """Realtime's check: can the user SELECT a broadcast row of this topic? (rolled back)"""
        with db.connect(self.owner.database_url) as conn, conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO realtime.messages (topic, extension, event, payload, private) "
                         "VALUES (%s, 'broadcast', 'probe', '{}', true)", (topic,))
            conn.execute("SET LOCAL ROLE authenticated")
            conn.execute("SELECT set_config('request.jwt.claims', %s, true), "
                         "set_config('realtime.topic', %s, true)", (json.dumps(claims), topic))
            row = conn.execute("SELECT count(*) AS n FROM realtime.messages WHERE topic = %s "
                               "AND extension = 'broadcast'", (topic,)).fetchone()
            return row["n"] > 0

    def last_message_id(self) -> int:
        with db.connect(self.owner.database_url) as conn:
            return conn.execute("SELECT coalesce(max(id), 0) AS id FROM realtime.messages").fetchone()["id"]

    def new_messages(self) -> list[dict[str, Any]]:
        names = {c["name"]: t for t, c in self.channels.items()}
        after = min((c["after"] for c in self.channels.values()), default=0)
        with db.connect(self.owner.database_url) as conn:
            rows = conn.execute("SELECT id, topic, event, payload FROM realtime.messages WHERE id > %s "
                                "AND topic = ANY(%s) AND extension = 'broadcast' ORDER BY id",
                                (after, list(names))).fetchall()
        return [dict(r, channel=names[r["topic"]]) for r in rows]

    async def deliver(self) -> None:
        """Each new realtime.messages row of a joined topic, once, as Realtime sends a broadcast."""
        while True:
            await asyncio.sleep(0.05)
            if not self.channels:
                continue
            for row in await asyncio.to_thread(self.new_messages):
                channel = self.channels.get(row["channel"])
                if channel is None or row["id"] in channel["sent"] or row["id"] <= channel["after"]:
                    continue
                channel["sent"].add(row["id"])
                payload = {"type": "broadcast", "event": row["event"], "payload": row["payload"],
                           "meta": {"id": str(uuid.uuid4())}}
                await self.send(row["channel"], "broadcast", payload)
                self.owner.broadcasts.append({"topic": row["channel"], "payload": payload})

    async def reply(self, topic: str, ref: str | None, status: str, response: dict[str, Any]) -> None:
        await self.send(topic, "phx_reply", {"status": status, "response": response}, ref)

    async def send(self, topic: str, event: str, payload: dict[str, Any], ref: str | None = None) -> None:
        await self.ws.send(json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref},
                                      default=str))
