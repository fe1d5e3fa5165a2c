"""Follow a job through Supabase as one of its users, with supabase-py (see service/follow.py).

Two Realtime features, the same lines either way:

- **Broadcast from the database** (the default): the database already sends each change of
  what a page shows of a job to the private topic `job:<id>` (sql/009_supabase.sql), one
  message per change, checked once when the channel is joined (the policy on
  realtime.messages lets only the job's owner join), so another user is refused at the door.
  The broadcast carries status and counts, not the output URLs (they can be kilobytes), so
  the follower reads the row through PostgREST when outputs were added.
- **Postgres Changes** (`--via changes`, and automatically when the private channel is refused
  to a user who *can* read the job: that user is its owner, so the project has no policy on
  realtime.messages, which 009 only warns about when it may not create one). It subscribes to
  UPDATEs of public.jobs filtered `id=eq.<job>` on a public channel; Realtime checks the row's
  row-level security for each WAL change and sends nothing to a user who may not see it, so
  the follower first reads the job through PostgREST and refuses, saying so, when it is not
  visible. It waits for Realtime's "Subscribed to PostgreSQL" before reading the row again, so
  no change falls between the read and the subscription. The record carries the outputs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import click
import httpx
from postgrest.exceptions import APIError
from realtime import AsyncRealtimeChannel, RealtimeSubscribeStates
from supabase import AsyncClient, AsyncClientOptions, acreate_client
from supabase_auth.errors import AuthError, AuthRetryableError
from websockets.exceptions import WebSocketException

from service.follow import TERMINAL, FollowRefused, Printer

READY_SECONDS = 20  # Realtime confirms a Postgres Changes subscription within seconds

COLUMNS = ("id,status,predictions_expected,predictions_succeeded,predictions_failed,outputs_processed,"
           "outputs,error")
SHOWN = ("status", "predictions_expected", "predictions_succeeded", "predictions_failed",
         "outputs_processed", "error")


@dataclass(frozen=True)
class SupabaseUser:
    url: str
    anon_key: str
    token: str | None = None        # an access token, or:
    email: str | None = None        # email and password, through supabase-py's auth
    password: str | None = None

    @classmethod
    def from_settings(cls, config: dict[str, Any], **given: str | None) -> SupabaseUser:
        url, key = config.get("SUPABASE_URL"), config.get("SUPABASE_ANON_KEY")
        if not (url and key):
            raise FollowRefused("following through Realtime needs SUPABASE_URL and SUPABASE_ANON_KEY "
                                "(the project's anon or publishable key)")
        user = cls(str(url).rstrip("/"), str(key), given.get("token"), given.get("email"),
                   given.get("password"))
        if not (user.token or (user.email and user.password)):
            raise FollowRefused("sign in as the job's owner: set SUPABASE_ACCESS_TOKEN (--token), or "
                                "SUPABASE_EMAIL and SUPABASE_PASSWORD (--email, --password)")
        return user


def follow_realtime(user: SupabaseUser, job_id: str, printer: Printer, *, feature: str = "broadcast",
                    note: Callable[[str], None] = lambda line: click.echo(line, err=True)) -> None:
    """Follow the job through Realtime: `feature` is "broadcast" (falling back to Postgres
    Changes when the project has no policy for it) or "changes"."""
    asyncio.run(_follow(user, job_id, printer, feature, note))


async def _follow(user: SupabaseUser, job_id: str, printer: Printer, feature: str,
                  note: Callable[[str], None]) -> None:
    client = await acreate_client(user.url, user.anon_key, AsyncClientOptions(
        auto_refresh_token=False, persist_session=False))
    try:
        token = await _sign_in(client, user)
        if feature == "changes":
            return await _follow_changes(client, token, job_id, printer)
        try:
            channel = await _join_broadcasts(client, token, job_id)
        except ChannelRefused as refused:
            if not await _readable(client, token, job_id):
                raise FollowRefused(f"{refused} (only the job's owner may follow it)") from None
            note(f"{refused}, though this user can read the job: the project has no policy on "
                 "realtime.messages for it (sql/009_supabase.sql); following through Postgres Changes")
            return await _follow_changes(client, token, job_id, printer)
        job = await _read(client, token, job_id)  # after joining: nothing falls between the two
        await _until_ended(channel, job, printer, lambda job, message: _apply_broadcast(
            client, token, job, message["payload"]))
    finally:
        await client.realtime.close()


async def _follow_changes(client: AsyncClient, token: str, job_id: str, printer: Printer) -> None:
    await _read(client, token, job_id)  # Realtime would send a non-owner nothing, not a refusal
    channel = await _subscribe_changes(client, token, job_id)
    job = await _read(client, token, job_id)  # subscribed to PostgreSQL: nothing falls between
    await _until_ended(channel, job, printer, _apply_change)


async def _until_ended(channel: _Channel, job: dict[str, Any], printer: Printer,
                       apply: Callable[[dict[str, Any], Any], Awaitable[dict[str, Any]]]) -> None:
    while not printer.show(job):
        kind, value = await channel.inbox.get()
        if kind == "state":
            raise FollowRefused(f"Realtime closed the channel {channel.name} ({_reason(value)}): the "
                                "connection was lost or the token expired; run the follower again")
        job = await apply(job, value)


async def _sign_in(client: AsyncClient, user: SupabaseUser) -> str:
    if user.token:
        return user.token
    try:
        response = await client.auth.sign_in_with_password({"email": user.email, "password": user.password})
    except (AuthRetryableError, httpx.HTTPError) as exc:  # supabase-py's name for "not reached"
        raise FollowRefused(f"cannot reach Supabase Auth at {user.url} ({exc}); check SUPABASE_URL") from None
    except AuthError as exc:
        raise FollowRefused(f"Supabase refused the sign-in of {user.email}: {exc.message}") from None
    if response.session is None:
        raise FollowRefused(f"Supabase gave {user.email} no session (is the email confirmed?)")
    return response.session.access_token


class ChannelRefused(FollowRefused):
    """Realtime refused to let this user join the channel."""


class _Channel:
    """One Realtime channel as the follower lives it: joined or refused, ready, then messages."""

    def __init__(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        self.name = name
        self.joined: asyncio.Future[object | None] = loop.create_future()  # None, or why not
        self.ready: asyncio.Future[object | None] = loop.create_future()   # Postgres Changes only
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_state(self, state: RealtimeSubscribeStates, error: Exception | None) -> None:
        if not self.joined.done():
            self.joined.set_result(None if state == RealtimeSubscribeStates.SUBSCRIBED else error or state)
        elif state in (RealtimeSubscribeStates.CHANNEL_ERROR, RealtimeSubscribeStates.CLOSED):
            if not self.ready.done():
                self.ready.set_result(error or state.value)
            self.inbox.put_nowait(("state", error or state.value))

    def on_system(self, payload: Any) -> None:
        if getattr(payload, "extension", "") == "postgres_changes" and not self.ready.done():
            self.ready.set_result(None)

    async def subscribe(self, client: AsyncClient, channel: AsyncRealtimeChannel) -> None:
        try:
            await channel.subscribe(self.on_state)
        except (OSError, WebSocketException) as exc:  # after the client's own retries
            raise FollowRefused(f"cannot reach Supabase Realtime at {client.realtime_url} "
                                f"({type(exc).__name__}: {exc})") from None
        refusal = await self.joined
        if refusal is not None:
            await client.realtime.remove_channel(channel)
            raise ChannelRefused(f"Realtime refused the {_kind(channel)} channel {self.name}: "
                                 f"{_reason(refusal)}")


def _kind(channel: AsyncRealtimeChannel) -> str:
    return "private" if channel.params["config"].get("private") else "public"


def _channel(client: AsyncClient, name: str, private: bool) -> AsyncRealtimeChannel:
    return client.channel(name, {"config": {"private": private, "broadcast": {"ack": False, "self": False},
                                            "presence": {"key": "", "enabled": False}}})


async def _join_broadcasts(client: AsyncClient, token: str, job_id: str) -> _Channel:
    """Join the private channel job:<id> with the user's token; ChannelRefused when Realtime says no."""
    await client.realtime.set_auth(token)
    state = _Channel(f"job:{job_id}")
    channel = _channel(client, state.name, private=True)
    channel.on_broadcast("UPDATE", lambda message: state.inbox.put_nowait(("change", message)))
    await state.subscribe(client, channel)
    return state


async def _subscribe_changes(client: AsyncClient, token: str, job_id: str) -> _Channel:
    """UPDATEs of public.jobs filtered to the job, on a public channel; returns once Realtime
    says it is subscribed to PostgreSQL (FollowRefused when it says it cannot be)."""
    await client.realtime.set_auth(token)
    state = _Channel(f"job-changes:{job_id}")
    channel = _channel(client, state.name, private=False)
    channel.on_postgres_changes("UPDATE", lambda message: state.inbox.put_nowait(("change", message["data"])),
                                table="jobs", schema="public", filter=f"id=eq.{job_id}")
    channel.on_system(state.on_system)
    await state.subscribe(client, channel)
    try:
        problem = await asyncio.wait_for(state.ready, READY_SECONDS)
    except TimeoutError:
        problem = f"no confirmation within {READY_SECONDS} s"
    if problem is not None:
        raise FollowRefused(f"Realtime could not stream changes of public.jobs for job {job_id}: "
                            f"{_reason(problem)} (is public.jobs in the supabase_realtime publication?)")
    return state


async def _rows(client: AsyncClient, token: str, job_id: str) -> list[dict[str, Any]]:
    """The job's row as the user sees it (PostgREST, row-level security): [] when not theirs."""
    rest = client.postgrest
    rest.auth(token)
    try:
        return (await rest.from_("jobs").select(COLUMNS).eq("id", job_id).execute()).data
    except APIError as exc:
        raise FollowRefused(f"Supabase refused to read job {job_id}: {exc.message}") from None
    except httpx.HTTPError as exc:
        raise FollowRefused(f"cannot reach Supabase's API ({type(exc).__name__})") from None


async def _readable(client: AsyncClient, token: str, job_id: str) -> bool:
    try:
        return bool(await _rows(client, token, job_id))
    except FollowRefused:
        return False


async def _read(client: AsyncClient, token: str, job_id: str) -> dict[str, Any]:
    rows = await _rows(client, token, job_id)
    if not rows:
        raise FollowRefused(f"no job {job_id} that this user may see (it is not theirs, or does not "
                            "exist): only the job's owner may follow it")
    return rows[0]


async def _apply_broadcast(client: AsyncClient, token: str, job: dict[str, Any],
                           message: dict[str, Any]) -> dict[str, Any]:
    """The job after one broadcast: its status and counts from the message; outputs read anew
    when some were added, or once it has ended."""
    record = message.get("record") or {}
    changed = {k: record[k] for k in SHOWN if k in record}
    merged = {**job, **changed}
    if merged.get("outputs_processed") != job.get("outputs_processed") or merged["status"] in TERMINAL:
        return await _read(client, token, str(job["id"]))  # read after the message: newer still
    return merged


async def _apply_change(job: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The job after one Postgres Changes UPDATE: the record has every column the user may
    select (a column the WAL left out, unchanged and stored out of line, keeps its value)."""
    if data.get("errors"):
        raise FollowRefused(f"Realtime sent job {job['id']}'s change with errors: {data['errors']}")
    record = data.get("record") or {}
    return {**job, **{k: record[k] for k in (*SHOWN, "outputs") if k in record}}


def _reason(refusal: object) -> str:
    """Realtime's reason, from an error reply ({"reason": ...}) or a system message ({"message": ...})."""
    text = str(refusal)
    try:
        details = json.loads(text)
        return str(details.get("reason") or details.get("message") or text)
    except (ValueError, AttributeError):
        return text
