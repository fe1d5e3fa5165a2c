"""The HTTP surface: routes, auth, rate limits and Replicate's JSON bodies (transport-free)."""

from __future__ import annotations

import hmac
import html
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from .catalog import Catalog, Model, validate
from .delivery import Deliveries
from .engine import Engine
from .faults import CreationLimiter, Faults
from .wire import ApiError, dumps, invalid_fields, not_found

MAX_BODY = 10 * 1024 * 1024
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, value: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})


def parse_duration(text: str) -> float:
    """Cancel-After values like '30s', '1m30s', '500ms', or plain seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    parts = DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ApiError(400, f"Cancel-After must be a duration like 30s or 1m30s, got {text!r}",
                       "Invalid Cancel-After header")
    return sum(float(number) * UNITS[unit] for number, unit in parts)


def parse_prefer(text: str | None) -> float | None:
    """Prefer: wait (60 s) or wait=N (1..60): block the creation response up to N seconds."""
    match = re.search(r"\bwait(?:=(\d+))?\b", text or "")
    if not match:
        return None
    return float(min(60, max(1, int(match[1] or 60))))


class Api:
    """Answers one request at a time; the HTTP server only moves bytes in and out."""

    def __init__(self, engine: Engine, deliveries: Deliveries, catalog: Catalog, secret: str,
                 token: str | None, faults: Callable[[], Faults],
                 set_faults: Callable[[object], Faults]) -> None:
        self.engine = engine
        self.cancel_after: dict[str, str] = {}  # each prediction's Cancel-After header, as sent
        self.deliveries = deliveries
        self.catalog = catalog
        self.secret = secret
        self.token = token
        self.faults = faults
        self.set_faults = set_faults
        self.limiter = CreationLimiter()
        v1 = r"^/v1"
        self.routes: list[tuple[re.Pattern[str], dict[str, Callable[..., Response]], bool]] = [
            (re.compile(v1 + r"/predictions$"), {"POST": self.create_by_version, "GET": self.list}, True),
            (re.compile(v1 + r"/predictions/(?P<pid>[^/]+)$"), {"GET": self.get}, True),
            (re.compile(v1 + r"/predictions/(?P<pid>[^/]+)/cancel$"), {"POST": self.cancel}, True),
            (re.compile(v1 + r"/models/(?P<owner>[^/]+)/(?P<name>[^/]+)/predictions$"),
             {"POST": self.create_by_model}, True),
            (re.compile(v1 + r"/deployments/(?P<owner>[^/]+)/(?P<name>[^/]+)/predictions$"),
             {"POST": self.create_by_deployment}, True),
            (re.compile(v1 + r"/webhooks/default/secret$"), {"GET": self.webhook_secret}, True),
            (re.compile(r"^/files/(?P<pid>[^/]+)/(?P<index>\d+)\.png$"), {"GET": self.file}, False),
            (re.compile(r"^/p/(?P<pid>[^/]+)$"), {"GET": self.web_page}, False),
            (re.compile(r"^/_sim/health$"), {"GET": self.health}, False),
            (re.compile(r"^/_sim/faults$"), {"GET": self.get_faults, "POST": self.post_faults}, False),
            (re.compile(r"^/_sim/webhooks$"), {"GET": self.webhooks}, False),
        ]

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Response:
        path = target.split("?", 1)[0]
        try:
            for pattern, handlers, needs_auth in self.routes:
                match = pattern.match(path)
                if not match:
                    continue
                handler = handlers.get("GET" if method == "HEAD" else method)
                if handler is None:
                    raise ApiError(405, f'Method "{method}" not allowed.')
                if needs_auth:
                    self.authenticate(headers)
                return handler(headers=headers, body=body, **match.groupdict())
            raise not_found()
        except ApiError as exc:
            return json_response(exc.status, exc.body, exc.headers)

    def authenticate(self, headers: Mapping[str, str]) -> None:
        scheme, _, token = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() not in ("bearer", "token") or not token.strip():
            raise ApiError(401, "You did not pass an authentication token", "Unauthenticated")
        if self.token and not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            raise ApiError(401, "You did not pass a valid authentication token", "Unauthenticated")

    # -- predictions -----------------------------------------------------------------------
    def create_by_version(self, headers: Mapping[str, str], body: bytes) -> Response:
        self.throttle()
        payload = self.json_object(body)
        model, version = self.catalog.by_version(payload)
        return self.create(model, version, payload, headers)

    def create_by_model(self, headers: Mapping[str, str], body: bytes, owner: str, name: str) -> Response:
        self.throttle()
        model = self.catalog.by_model(owner, name)
        return self.create(model, model.version, self.json_object(body), headers)

    def create_by_deployment(self, headers: Mapping[str, str], body: bytes, owner: str,
                             name: str) -> Response:
        self.throttle()
        model = self.catalog.by_deployment(owner, name)
        return self.create(model, model.version, self.json_object(body), headers)

    def create(self, model: Model, version: str, payload: Mapping, headers: Mapping[str, str]) -> Response:
        request = validate(payload, model, version)
        deadline = headers.get("Cancel-After")
        prediction = self.engine.create(request, parse_duration(deadline) if deadline else None)
        if deadline:
            self.cancel_after[prediction["id"]] = deadline
        extra = {"Location": prediction["urls"]["get"]}
        wait = parse_prefer(headers.get("Prefer"))
        if wait:
            prediction = self.engine.wait(prediction["id"], wait) or prediction
            extra["Preference-Applied"] = f"wait={int(wait)}"
        return json_response(201, prediction, extra)

    def get(self, headers: Mapping[str, str], body: bytes, pid: str) -> Response:
        prediction = self.engine.get(pid)
        if prediction is None:
            raise not_found()
        return json_response(200, prediction)

    def list(self, headers: Mapping[str, str], body: bytes) -> Response:
        newest = sorted(self.engine.all().values(), key=lambda p: p["created_at"], reverse=True)
        return json_response(200, {"next": None, "previous": None, "results": newest[:100]})

    def cancel(self, headers: Mapping[str, str], body: bytes, pid: str) -> Response:
        prediction = self.engine.cancel(pid)
        if prediction is None:
            raise not_found()
        return json_response(200, prediction)

    def webhook_secret(self, headers: Mapping[str, str], body: bytes) -> Response:
        return json_response(200, {"key": self.secret})

    def file(self, headers: Mapping[str, str], body: bytes, pid: str, index: str) -> Response:
        data = self.engine.file(pid, int(index))
        if data is None:
            raise not_found()
        return Response(200, data, {"Content-Type": "image/png", "Cache-Control": "max-age=3600"})

    def web_page(self, headers: Mapping[str, str], body: bytes, pid: str) -> Response:
        prediction = self.engine.get(pid)
        if prediction is None:
            raise not_found()
        images = "".join(f'<p><a href="{html.escape(url)}"><img src="{html.escape(url)}" width="256">'
                         f"</a></p>" for url in prediction["output"] or [])
        page = (f"<!doctype html><title>{pid}</title><h1>{html.escape(prediction['model'])}</h1>"
                f"<p>status: {prediction['status']}</p>{images}<pre>{html.escape(prediction['logs'] or '')}"
                f"</pre>")
        return Response(200, page.encode(), {"Content-Type": "text/html; charset=utf-8"})

    # -- the simulator's own controls --------------------------------------------------------
    def health(self, headers: Mapping[str, str], body: bytes) -> Response:
        return json_response(200, {"ok": True, "predictions": len(self.engine.all())})

    def get_faults(self, headers: Mapping[str, str], body: bytes) -> Response:
        return json_response(200, self.faults().as_dict())

    def post_faults(self, headers: Mapping[str, str], body: bytes) -> Response:
        try:
            faults = self.set_faults(json.loads(body or b"{}"))
        except ValueError as exc:
            raise ApiError(400, str(exc), "Invalid fault settings") from None
        return json_response(200, faults.as_dict())

    def webhooks(self, headers: Mapping[str, str], body: bytes) -> Response:
        return json_response(200, [asdict(attempt) for attempt in self.deliveries.log])

    # -- helpers -----------------------------------------------------------------------------
    def throttle(self) -> None:
        retry_after = self.limiter.admit(self.faults())
        if retry_after is not None:
            unit = "second" if retry_after == 1 else "seconds"
            error = ApiError(429, f"Request was throttled. Expected available in {retry_after} {unit}.",
                             retry_after=retry_after)
            error.headers["Retry-After"] = str(retry_after)
            raise error

    @staticmethod
    def json_object(body: bytes) -> dict:
        if len(body) > MAX_BODY:
            raise ApiError(413, "Request body is too large.")
        try:
            payload = json.loads(body or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"JSON parse error - {exc}", "Invalid JSON") from None
        if not isinstance(payload, dict):
            raise invalid_fields([("(root)", "invalid_type", "Invalid type. Expected: object")])
        return payload
