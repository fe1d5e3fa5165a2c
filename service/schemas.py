"""The jobs API's shapes: marshmallow schemas for what it accepts and what it answers."""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from marshmallow import (
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates,
    validates_schema,
)

MAX_BODY_BYTES = 1024 * 1024
MAX_INPUT_BYTES = 256 * 1024
MAX_METADATA_BYTES = 16 * 1024
MAX_JSON_DEPTH = 64
MAX_COUNT = 50
MAX_PAGE = 100
MAX_IDEMPOTENCY_KEY = 200
JOB_STATUSES = ("pending", "queued", "running", "processing", "completed", "failed", "canceled")
POSTPROCESS_MODES = ("auto", "upscale", "resize", "none")
TARGETS = ("model", "version", "deployment")

# Replicate names: owner and model/deployment names of letters, digits, - _ and .
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
MODEL_RE = re.compile(rf"^{_NAME}/{_NAME}$")
# POST /v1/predictions takes a version as "<64 hex>" or "owner/name:<64 hex>" (bare
# "owner/name" is an official model: that is the `model` field here).
VERSION_RE = re.compile(rf"^(?:{_NAME}/{_NAME}:)?[0-9a-f]{{64}}$")
RATIO_RE = re.compile(r"^([1-9][0-9]{0,2}):([1-9][0-9]{0,2})$")
IDEMPOTENCY_KEY_RE = re.compile(rf"^[\x20-\x7e]{{1,{MAX_IDEMPOTENCY_KEY}}}$")
_BRACES = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_OUTPUT_REF = re.compile(r"^\s*outputs\[(0|[1-9][0-9]{0,3})\]\s*$")


MAX_CANCEL_AFTER = 365 * 24 * 3600  # a year: Replicate's Cancel-After has no documented maximum
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: object) -> float:
    """A deadline as seconds: a number, or Replicate's duration text ("90s", "5m", "1h30m",
    "500ms"). ValueError, with a message for people, when it is neither, or outside 1 s to a year."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError('must be seconds (a number) or a duration like "90s", "5m" or "1h30m"')
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):  # plain seconds, as an environment variable says it
            text += "s"
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError('must be seconds (a number) or a duration like "90s", "5m" or "1h30m", '
                             f"not {value!r}")
        value = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not 1 <= value <= MAX_CANCEL_AFTER:
        raise ValueError(f"must be from 1 second to {MAX_CANCEL_AFTER} seconds (a year), not {value:g}")
    return round(float(value), 3)


class CancelAfter(fields.Field):
    """cancel_after: seconds, or a duration like "90s"; loaded as seconds (3 decimals)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        try:
            return duration_seconds(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


def is_ratio(value: object) -> bool:
    """A "W:H" aspect ratio of positive whole numbers up to 100."""
    match = RATIO_RE.match(value) if isinstance(value, str) else None
    return bool(match) and all(int(part) <= 100 for part in match.groups())


def _strings(value: Any) -> list[str]:
    """Every string in a JSON document, keys too. Refuses a document nested deeper than
    MAX_JSON_DEPTH, or with text PostgreSQL's jsonb cannot store (NUL, lone surrogates)."""
    found, stack = [], [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValidationError(f"is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, str):
            found.append(_storable(item))
        elif isinstance(item, Mapping):
            stack.extend((child, depth + 1) for pair in item.items() for child in pair)
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return found


def _storable(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValidationError("contains a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
    if "\x00" in text:
        raise ValidationError("contains a NUL character (\\u0000), which cannot be stored")
    return text


def _placeholders(value: Any) -> list[str]:
    """The inner text of every {{...}} that mentions output(s)."""
    return [m for s in _strings(value) for m in _BRACES.findall(s) if "output" in m]


def json_size(limit: int):
    """A validator: the value, serialized as compact UTF-8 JSON, fits in `limit` bytes."""
    def check(value: Any) -> None:
        _strings(value)  # depth first: a too-deep document is refused before it is serialized
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > limit:
            raise ValidationError(f"is {size} bytes as JSON; at most {limit} are allowed")
    return check


class StrictInt(fields.Integer):
    """An integer written as one in JSON: not a string, float or boolean."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class Cursor(fields.String):
    """An opaque page cursor: urlsafe base64 of "<created_at ISO 8601>|<job id>"."""

    default_error_messages = {"invalid": "Not a valid cursor; pass next_cursor from a previous page."}

    @staticmethod
    def encode(created_at: datetime, job_id: uuid.UUID | str) -> str:
        raw = f"{created_at.isoformat()}|{job_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            stamp, _, job_id = raw.partition("|")
            created_at = datetime.fromisoformat(stamp)
            if created_at.tzinfo is None:
                raise ValueError("naive timestamp")
            return created_at, uuid.UUID(job_id)
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise self.make_error("invalid") from exc


def _describe(text: str, **kwargs: Any) -> dict[str, Any]:
    return {"metadata": {"description": text}, **kwargs}


class PostprocessSchema(Schema):
    mode = fields.String(load_default="auto", validate=validate.OneOf(POSTPROCESS_MODES), **_describe(
        "auto: upscale square outputs, resize others to aspect_ratio; none: store as produced"))
    width = StrictInt(validate=validate.Range(16, 8192), **_describe("target width in pixels"))
    height = StrictInt(validate=validate.Range(16, 8192), **_describe("target height in pixels"))
    long_side = StrictInt(validate=validate.Range(16, 8192), **_describe("target longer side in pixels"))

    @validates_schema
    def _sizes(self, data: dict[str, Any], **kwargs: Any) -> None:
        sizes = [k for k in ("width", "height", "long_side") if k in data]
        if data.get("mode") == "none" and sizes:
            raise ValidationError("mode none keeps outputs as produced; give no size", sizes[0])
        if "long_side" in data and len(sizes) > 1:
            raise ValidationError("give long_side or width/height, not both", "long_side")


class _StepSchema(Schema):
    """What one step runs: exactly one of model, version, deployment, and its input."""

    model = fields.String(load_default=None, validate=validate.Regexp(MODEL_RE, error="must be owner/name"),
                          **_describe("an official model, owner/name"))
    version = fields.String(load_default=None, validate=validate.Regexp(
        VERSION_RE, error="must be a 64-hex version id or owner/name:<64-hex version id>"),
        **_describe("a model version: 64-hex id or owner/name:<id>"))
    deployment = fields.String(load_default=None, validate=validate.Regexp(
        MODEL_RE, error="must be owner/name"), **_describe("a deployment, owner/name"))
    input = fields.Dict(keys=fields.String(), required=True, validate=json_size(MAX_INPUT_BYTES),
                        **_describe("the model's input, passed to Replicate as is (≤ 256 KB as JSON)"))

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _one_target(self, data: dict[str, Any], original: Any, **kwargs: Any) -> None:
        given = [k for k in TARGETS if isinstance(original, Mapping) and original.get(k) is not None]
        if not given:
            raise ValidationError("give one of model, version or deployment", "model")
        if len(given) > 1:
            message = f"give only one of model, version or deployment (got {', '.join(given)})"
            raise ValidationError({k: [message] for k in given})

    @post_load
    def _drop_unset(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {k: v for k, v in data.items() if not (k in TARGETS and v is None)}


class ThenSchema(_StepSchema):
    """A second step, run on the first step's processed outputs (stored now, run later)."""

    @validates("input")
    def _references(self, value: dict[str, Any], **kwargs: Any) -> None:
        bad = [p for p in _placeholders(value) if not _OUTPUT_REF.match(p)]
        if bad:
            raise ValidationError(f"placeholder {{{{{bad[0]}}}}} is not of the form {{{{outputs[N]}}}}")


_OWNER_FORM = "must be a user id: a UUID like 3f2b8c1e-5a7d-4e9b-8c2f-1d6a9e0b4c7f"


class JobRequestSchema(_StepSchema):
    aspect_ratio = fields.String(load_default=None, **_describe(
        'W:H of positive whole numbers ≤ 100; default input.aspect_ratio when valid, else "1:1"'))
    count = StrictInt(load_default=1, validate=validate.Range(1, MAX_COUNT),
                      **_describe("how many predictions to run, 1-50"))
    postprocess = fields.Nested(PostprocessSchema, load_default=lambda: {"mode": "auto"})
    then = fields.Nested(ThenSchema, load_default=None)
    metadata = fields.Dict(keys=fields.String(), load_default=None, validate=json_size(MAX_METADATA_BYTES),
                           **_describe("the caller's own data, kept with the job (≤ 16 KB as JSON)"))
    owner = fields.UUID(load_default=None, error_messages={"invalid_uuid": _OWNER_FORM}, **_describe(
        "the Supabase user id the job is for (an API key only; a signed-in user's jobs are theirs)"))

    @validates("owner")
    def _owner(self, value: uuid.UUID | None, **kwargs: Any) -> None:
        if value is not None and value.int == 0:
            raise ValidationError("the nil uuid is no user's id")

    cancel_after = CancelAfter(load_default=None, metadata={
        "type": "string", "description": 'a deadline for the whole job: seconds (a number) or a duration '
        'like "90s", "5m", "1h30m"; default JOB_CANCEL_AFTER. Each prediction is created with '
        "Replicate's Cancel-After set to the time left; work still queued then is not sent"})

    @validates("aspect_ratio")
    def _ratio(self, value: str | None, **kwargs: Any) -> None:
        if value is not None and not is_ratio(value):
            raise ValidationError('must be "W:H" with whole numbers from 1 to 100, like "3:4"')

    @validates("input")
    def _no_references(self, value: dict[str, Any], **kwargs: Any) -> None:
        if _placeholders(value):
            raise ValidationError("{{outputs[N]}} placeholders belong in then.input only")

    @post_load
    def _defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if data["aspect_ratio"] is None:
            suggested = data["input"].get("aspect_ratio")
            data["aspect_ratio"] = suggested if is_ratio(suggested) else "1:1"
        return data


class JobListQuerySchema(Schema):
    status = fields.String(load_default=None, validate=validate.OneOf(JOB_STATUSES))
    model = fields.String(load_default=None, validate=validate.Regexp(MODEL_RE, error="must be owner/name"))
    limit = fields.Integer(load_default=20, validate=validate.Range(1, MAX_PAGE),
                           **_describe("jobs per page, 1-100"))
    cursor = Cursor(load_default=None, **_describe("next_cursor of the previous page"))


class ProgressSchema(Schema):
    total = fields.Integer(**_describe("predictions the job runs: count, and one more for `then`"))
    succeeded = fields.Integer()
    failed = fields.Integer(**_describe("predictions failed, canceled or aborted"))
    processed = fields.Integer(**_describe("outputs downloaded, resized and stored"))


class StepProgressSchema(Schema):
    step = fields.Integer(**_describe("1, or 2 for the job's `then`"))
    target = fields.String(allow_none=True, **_describe("the step's model, else deployment, else version"))
    total = fields.Integer(**_describe("predictions the step runs"))
    succeeded = fields.Integer()
    failed = fields.Integer(**_describe("predictions failed, canceled or aborted (or refused)"))
    processed = fields.Integer(**_describe("the step's outputs processed"))


class PredictionSchema(Schema):
    id = fields.String()
    step = fields.Integer(allow_none=True)
    superseded = fields.Boolean(**_describe("a retry submitted it again: kept for history, not counted"))
    status = fields.String(**_describe("starting, processing, succeeded, failed, canceled or aborted"))
    error = fields.String(allow_none=True)
    metrics = fields.Dict()
    created_at = fields.DateTime(allow_none=True)
    started_at = fields.DateTime(allow_none=True)
    completed_at = fields.DateTime(allow_none=True)


class OutputSchema(Schema):
    prediction_id = fields.String()
    step = fields.Integer(**_describe("the job's step whose prediction made it: 1, or 2 for `then`"))
    index = fields.Integer(**_describe("its place in the prediction's output"))
    source_url = fields.String(allow_none=True, **_describe("where Replicate delivered it"))
    url = fields.String(allow_none=True, **_describe("where the processed file is stored"))
    width = fields.Integer(allow_none=True)
    height = fields.Integer(allow_none=True)


class JobSummarySchema(Schema):
    id = fields.UUID()
    status = fields.String(validate=validate.OneOf(JOB_STATUSES))
    model = fields.String(allow_none=True)
    version = fields.String(allow_none=True)
    deployment = fields.String(allow_none=True)
    aspect_ratio = fields.String()
    postprocess = fields.Nested(PostprocessSchema)
    progress = fields.Nested(ProgressSchema)
    outputs = fields.List(fields.Nested(OutputSchema))
    error = fields.String(allow_none=True)
    metadata = fields.Dict()
    created_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    completed_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime()
    deadline = fields.DateTime(allow_none=True, **_describe(
        "when cancel_after runs out; the job then ends, failed with error 'deadline exceeded'"))
    retries = fields.Integer(**_describe("retry rounds so far (POST /api/jobs/{id}/retry)"))
    cost = fields.Nested(lambda: CostSchema())


class CostSchema(Schema):
    compute_seconds = fields.Float(allow_none=True, **_describe(
        "sum of metrics.predict_time over the job's predictions (retried ones too: they ran); "
        "missing or negative values left out; null when none reported one"))
    predict_time_anomalies = fields.Integer(**_describe(
        "predictions whose negative predict_time was left out"))
    estimated_dollars = fields.Float(allow_none=True, **_describe(
        "from the operator's REPLICATE_PRICES (Replicate publishes no prices through its API); "
        "null when no prediction has a price"))
    unpriced_predictions = fields.Integer(**_describe(
        "predictions left out of estimated_dollars: no price for their model, or no predict_time"))


class JobSchema(JobSummarySchema):
    owner = fields.UUID(attribute="owner_id", allow_none=True, **_describe(
        "the user the job is for: its creator, or the user an API key named; null for none"))
    predictions = fields.List(fields.Nested(PredictionSchema))
    steps = fields.List(fields.Nested(StepProgressSchema), **_describe(
        "progress step by step: one step, or two with `then`; they add up to progress"))


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSummarySchema), **_describe("newest first"))
    next_cursor = fields.String(allow_none=True, **_describe(
        "pass as cursor for the next page; null on the last page"))


class EventSchema(Schema):
    position = fields.Integer()
    type = fields.String()
    event_key = fields.String()
    recorded_at = fields.DateTime()
    data = fields.Dict()


class EventListSchema(Schema):
    events = fields.List(fields.Nested(EventSchema), **_describe("in recording order"))


class ErrorSchema(Schema):
    error = fields.String(**_describe("a stable code, e.g. invalid_request, not_found, unauthorized"))
    message = fields.String()
    fields_ = fields.Dict(data_key="fields", keys=fields.String(), values=fields.List(fields.String()),
                          **_describe("invalid_request only: messages per field (dotted for nested ones)"))


def flatten(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested error dict as {"postprocess.mode": [...], "input": [...]}."""
    if not isinstance(messages, Mapping):
        return {prefix or "body": [str(m) for m in (messages if isinstance(messages, list) else [messages])]}
    out: dict[str, list[str]] = {}
    for key, value in messages.items():
        name = prefix if key == "_schema" else f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name))
    return out
