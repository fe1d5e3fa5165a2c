"""What a job cost: compute seconds from Replicate's metrics.predict_time, and dollars
estimated from the operator's prices (REPLICATE_PRICES). Replicate publishes no prices
through its API, so nothing here guesses one: a model without a price is counted as unpriced.

REPLICATE_PRICES is a JSON object from a model ("owner/name") or one version of it
("owner/name:version") to its price, {"per_second": dollars} or {"per_prediction": dollars}:

    {"stability-ai/sdxl": {"per_second": 0.000725},
     "black-forest-labs/flux-schnell": {"per_prediction": 0.003}}

A version's own price wins over its model's. per_second is charged on each prediction's
predict_time; per_prediction on each prediction that succeeded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from service.errors import ConfigError

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_KEY = re.compile(rf"^{_NAME}/{_NAME}(?::[A-Za-z0-9][A-Za-z0-9_.-]{{0,127}})?$")
UNITS = ("per_second", "per_prediction")


@dataclass(frozen=True)
class Price:
    unit: str  # per_second or per_prediction
    dollars: float


def parse_prices(text: str | None) -> dict[str, Price]:
    """REPLICATE_PRICES as {key: Price}; ConfigError naming what is wrong. Unset: no prices."""
    if not text or not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"REPLICATE_PRICES must be JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("REPLICATE_PRICES must be a JSON object like "
                          '{"owner/name": {"per_second": 0.000725}}')
    return {key: _price(key, value) for key, value in raw.items()}


def _price(key: str, value: Any) -> Price:
    if not _KEY.match(key):
        raise ConfigError(f"REPLICATE_PRICES: {key!r} is not a model (owner/name) or owner/name:version")
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in UNITS:
        raise ConfigError(f'REPLICATE_PRICES[{key!r}] must be {{"per_second": dollars}} '
                          'or {"per_prediction": dollars}')
    unit, dollars = next(iter(value.items()))
    if isinstance(dollars, bool) or not isinstance(dollars, int | float) or not math.isfinite(dollars) \
            or dollars < 0:
        raise ConfigError(f"REPLICATE_PRICES[{key!r}].{unit} must be a number of dollars ≥ 0, "
                          f"got {dollars!r}")
    return Price(unit, float(dollars))


def price_for(prices: Mapping[str, Price], model: str | None, version: str | None) -> Price | None:
    """The price of a model's version, else of the model, else None."""
    if model and version and f"{model}:{version}" in prices:
        return prices[f"{model}:{version}"]
    return prices.get(model) if model else None


def job_cost(groups: Iterable[Mapping[str, Any]], prices: Mapping[str, Price]) -> dict[str, Any]:
    """A job's cost from its predictions grouped by model and version (the job_compute query)."""
    seconds, anomalies, dollars, unpriced, priced = None, 0, 0.0, 0, False
    for g in groups:
        anomalies += g["anomalies"]
        if g["seconds"] is not None:
            seconds = (seconds or 0.0) + float(g["seconds"])
        price = price_for(prices, g["model"], g["version"])
        if price is None:
            unpriced += g["billable"]
        elif price.unit == "per_second":
            priced = priced or g["timed"] > 0
            dollars += price.dollars * float(g["seconds"] or 0)
            unpriced += g["untimed"]
        else:
            priced = priced or g["succeeded"] > 0
            dollars += price.dollars * g["succeeded"]
    return {"compute_seconds": None if seconds is None else round(seconds, 6),
            "predict_time_anomalies": anomalies,
            "estimated_dollars": round(dollars, 6) if priced else None,
            "unpriced_predictions": unpriced}
