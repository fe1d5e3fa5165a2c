"""Follow a job through Supabase as one of its users, with supabase-py (see service/follow.py).

Why Broadcast and not Postgres Changes: the database already sends each change of what a
page shows of a job to the private topic `job:<id>` (sql/009_supabase.sql), one message per
change, checked once when the channel is joined (the policy on realtime.messages lets only
the job's owner join). Postgres Changes would have Realtime check every subscriber's
row-level security for every WAL change of `jobs`, and a user who may not see the job would
simply hear nothing. The broadcast carries status and counts, not the output URLs (they can
be kilobytes), so the follower reads the row through PostgREST when outputs were added.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx
from postgrest.exceptions import APIError
from realtime import RealtimeSubscribeStates
from supabase import AsyncClient, AsyncClientOptions, acreate_client
from supabase_auth.errors import AuthError, AuthRetryableError
from websockets.exceptions import WebSocketException

from service.follow import TERMINAL, FollowRefused, Printer

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


def follow_realtime(user: SupabaseUser, job_id: str, printer: Printer) -> None:
    asyncio.run(_follow(user, job_id, printer))


async def _follow(user: SupabaseUser, job_id: str, printer: Printer) -> None:
    client = await acreate_client(user.url, user.anon_key, AsyncClientOptions(
        auto_refresh_token=False, persist_session=False))
    try:
        token = await _sign_in(client, user)
        inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        await _join(client, token, job_id, inbox)
        job = await _read(client, token, job_id)  # after joining: nothing falls between the two
        while not printer.show(job):
            kind, value = await inbox.get()
            if kind == "state":
                raise FollowRefused(f"Realtime closed the channel job:{job_id} ({value}): the connection "
                                    "was lost or the token expired; run the follower again")
            job = await _apply(client, token, job, value)
    finally:
        await client.realtime.close()


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


async def _join(client: AsyncClient, token: str, job_id: str, inbox: asyncio.Queue) -> None:
    """Join the private channel job:<id> with the user's token; FollowRefused when Realtime says no."""
    await client.realtime.set_auth(token)
    channel = client.channel(f"job:{job_id}", {"config": {
        "private": True, "broadcast": {"ack": False, "self": False},
        "presence": {"key": "", "enabled": False}}})
    channel.on_broadcast("UPDATE", lambda message: inbox.put_nowait(("change", message["payload"])))
    joined: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
        if not joined.done():
            joined.set_result(None if state == RealtimeSubscribeStates.SUBSCRIBED else error or state)
        elif state in (RealtimeSubscribeStates.CHANNEL_ERROR, RealtimeSubscribeStates.CLOSED):
            inbox.put_nowait(("state", error or state.value))

    try:
        await channel.subscribe(on_state)
    except (OSError, WebSocketException) as exc:  # after the client's own retries
        raise FollowRefused(f"cannot reach Supabase Realtime at {client.realtime_url} "
                            f"({type(exc).__name__}: {exc})") from None
    refusal = await joined
    if refusal is not None:
        raise FollowRefused(f"Realtime refused the private channel job:{job_id}: {_reason(refusal)} "
                            "(only the job's owner may follow it)")


async def _read(client: AsyncClient, token: str, job_id: str) -> dict[str, Any]:
    """The job's row as the user sees it (PostgREST, row-level security)."""
    rest = client.postgrest
    rest.auth(token)
    try:
        rows = (await rest.from_("jobs").select(COLUMNS).eq("id", job_id).execute()).data
    except APIError as exc:
        raise FollowRefused(f"Supabase refused to read job {job_id}: {exc.message}") from None
    except httpx.HTTPError as exc:
        raise FollowRefused(f"cannot reach Supabase's API ({type(exc).__name__})") from None
    if not rows:
        raise FollowRefused(f"no job {job_id} that this user may see (it is not theirs, or does not exist)")
    return rows[0]


async def _apply(client: AsyncClient, token: str, job: dict[str, Any],
                 message: dict[str, Any]) -> dict[str, Any]:
    """The job after one broadcast: its status and counts from the message; outputs read anew
    when some were added, or once it has ended."""
    record = message.get("record") or {}
    changed = {k: record[k] for k in SHOWN if k in record}
    merged = {**job, **changed}
    if merged.get("outputs_processed") != job.get("outputs_processed") or merged["status"] in TERMINAL:
        return await _read(client, token, str(job["id"]))  # read after the message: newer still
    return merged


def _reason(refusal: object) -> str:
    """Realtime's reason, from the join's error reply ({"reason": "..."}) when it gave one."""
    text = str(refusal)
    try:
        return str(json.loads(text).get("reason") or text)
    except (ValueError, AttributeError):
        return text
