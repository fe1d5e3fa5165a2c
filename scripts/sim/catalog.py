"""The models the simulator runs, and validation of prediction requests against them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .images import parse_ratio
from .wire import ApiError, invalid_fields, not_found

EVENTS = ("start", "output", "logs", "completed")
VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
GENERIC_MODEL = "replicate-sim/image-model"


@dataclass(frozen=True)
class Model:
    """A text-to-image model: its name, the version predictions report, and its input rules."""

    name: str
    version: str = "hidden"          # official models report "hidden", as in real webhooks
    required: tuple[str, ...] = ("prompt",)
    steps: int = 50                  # default num_inference_steps
    max_outputs: int = 4


SDXL = Model("stability-ai/sdxl", "7762fd07cf82c948538e41f63f77d685e02b063e37e496e96eefd46c929f9bdc",
             required=(), steps=50)
MODELS = {model.name: model for model in (
    SDXL,
    Model("bytedance/sdxl-lightning-4step",
          "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637", steps=4),
    Model("black-forest-labs/flux-schnell", steps=4),
    Model("black-forest-labs/flux-dev", steps=28),
    Model("black-forest-labs/flux-1.1-pro", steps=25, max_outputs=1),
    Model("black-forest-labs/flux-kontext-pro", steps=25, max_outputs=1),
    Model("stability-ai/stable-diffusion-3.5-large", steps=35, max_outputs=1),
)}
# Versions seen in real payloads map to their model; any other 64-hex id runs GENERIC_MODEL.
VERSIONS = {SDXL.version: SDXL,
            "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b": SDXL,
            **{m.version: m for m in MODELS.values() if m.version != "hidden"}}


@dataclass(frozen=True)
class Request:
    """A validated creation request."""

    model: Model
    version: str
    input: dict
    webhook: str | None
    events: tuple[str, ...]


class Catalog:
    """Looks up models, versions and deployments; extra models and deployments are configurable."""

    def __init__(self, extra_models: tuple[str, ...] = (),
                 deployments: Mapping[str, str] | None = None) -> None:
        self.models = dict(MODELS)
        for name in extra_models:
            self.models.setdefault(name, Model(name, required=()))
        self.deployments = dict(deployments) if deployments is not None else None

    def by_version(self, body: Mapping) -> tuple[Model, str]:
        version = body.get("version")
        if version is None:
            raise invalid_fields([("version", "required", "version is required")])
        if not isinstance(version, str):
            raise invalid_fields([("version", "invalid_type", "Invalid type. Expected: string")])
        name, _, version_id = version.rpartition(":")
        if not name and version in self.models:  # "owner/name" of an official model
            return self.models[version], self.models[version].version
        if not VERSION_ID.match(version_id):
            raise ApiError(422, "The specified version does not exist (or perhaps you don't have "
                                "permission to use it?)", "Invalid version or not permitted")
        model = VERSIONS.get(version_id) or self.models.get(name) or Model(GENERIC_MODEL, required=())
        return model, version_id

    def by_model(self, owner: str, name: str) -> Model:
        model = self.models.get(f"{owner}/{name}")
        if model is None:
            raise not_found()
        return model

    def by_deployment(self, owner: str, name: str) -> Model:
        """Any well-formed deployment runs SDXL unless deployments were configured."""
        slug = f"{owner}/{name}"
        if self.deployments is None:
            if not SLUG.match(slug):
                raise not_found()
            return SDXL
        target = self.deployments.get(slug)
        if target is None:
            raise not_found()
        return self.models.get(target) or Model(target, required=())


def validate(body: Mapping, model: Model, version: str) -> Request:
    """Check input, webhook and webhook_events_filter; one 422 lists every problem."""
    problems: list[tuple[str, str, str]] = []
    model_input = body.get("input")
    if not isinstance(model_input, dict):
        problems.append(("input", "invalid_type", "Invalid type. Expected: object"))
        model_input = {}
    problems += _input_problems(model_input, model)
    webhook = body.get("webhook")
    if webhook is not None and not (isinstance(webhook, str) and re.match(r"^https?://[^\s/]+", webhook)):
        problems.append(("webhook", "format", "Does not match format 'uri'"))
    events = body.get("webhook_events_filter")
    if events is None:
        events = list(EVENTS)
    elif not isinstance(events, list) or not events:
        problems.append(("webhook_events_filter", "invalid_type", "Invalid type. Expected: array"))
        events = []
    for index, event in enumerate(events):
        if event not in EVENTS:
            problems.append((f"webhook_events_filter.{index}", "enum",
                             'must be one of the following: "start", "output", "logs", "completed"'))
    if problems:
        raise invalid_fields(problems)
    ordered = tuple(event for event in EVENTS if event in events)
    return Request(model, version, dict(model_input), webhook, ordered)


def _integer(value: object, low: int, high: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return "Invalid type. Expected: integer"
    if value < low:
        return f"Must be greater than or equal to {low}"
    if value > high:
        return f"Must be less than or equal to {high}"
    return None


def _input_problems(model_input: dict, model: Model) -> list[tuple[str, str, str]]:
    problems = [("input", "required", f"{name} is required")
                for name in model.required if name not in model_input]
    if "prompt" in model_input and not isinstance(model_input["prompt"], str):
        problems.append(("input.prompt", "invalid_type", "Invalid type. Expected: string"))
    if "aspect_ratio" in model_input and not parse_ratio(model_input["aspect_ratio"]):
        problems.append(("input.aspect_ratio", "format", "Must be a ratio like 16:9"))
    bounds = {"num_outputs": (1, model.max_outputs), "num_inference_steps": (1, 500),
              "width": (64, 2048), "height": (64, 2048), "seed": (0, 2**32 - 1)}
    for name, (low, high) in bounds.items():
        problem = _integer(model_input[name], low, high) if name in model_input else None
        if problem:
            kind = "invalid_type" if problem.startswith("Invalid") else "number_bounds"
            problems.append((f"input.{name}", kind, problem))
    return problems
