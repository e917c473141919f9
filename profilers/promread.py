"""A window's energy and tokens read through an existing Prometheus (``campaign run --prometheus URL``).

Each counter query (default: ours, ``llm_energy_energy_joules_total`` and ``llm_energy_tokens_total{kind=
"generated"}``) is read at the window's own start and end (wall-clock) times. A selector's raw samples either side of
each edge are interpolated linearly (the campaign waits one scrape interval after the window so that the sample
after its end exists); an expression is evaluated as an instant vector at each edge (the last sample at or before it,
up to one scrape interval old) and rescaled from the samples' own timestamps (``timestamp(query)``) to the window.
What is left unknown is reported: at most the mean power times the scrape interval (``/api/v1/targets``'s largest
``scrapeInterval``), ``uncertainty_j``. A series that went
backwards (counter reset) or is missing at an edge is dropped and named, never counted as zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import httpx

from profilers.errors import TestbedError

DEFAULT_ENERGY_QUERY = "llm_energy_energy_joules_total"
DEFAULT_TOKEN_QUERY = 'llm_energy_tokens_total{kind="generated"}'


class PrometheusQueryError(TestbedError, RuntimeError):
    """A Prometheus that cannot be queried, or a query it refuses or answers with something not a vector."""


@dataclass
class PromIncrease:
    """Increase of every series of a counter query between two instants."""

    per_series: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    """Series that went backwards or were missing at an edge (not counted)."""
    provenance: dict[str, str] = field(default_factory=dict)
    """Each series' ``provenance`` label (``unknown`` where it has none)."""
    span_s: float = math.nan
    """Seconds between the samples the difference was taken from (the window's own duration after rescaling)."""

    @property
    def total(self) -> float:
        """The increase summed over every counted series."""
        return sum(self.per_series.values())


def _key(metric: dict[str, str]) -> str:
    labels = {k: v for k, v in metric.items() if k != "__name__"}
    if "replica" in labels or "device" in labels:
        return f"{labels.get('replica', '')}/{labels.get('device', '')}"
    return json.dumps(labels, sort_keys=True)


async def instant(client: httpx.AsyncClient, base_url: str, query: str, at: float,
                  labels: dict[str, dict[str, str]] | None = None) -> dict[str, float]:
    """``query`` at wall-clock time ``at``: value by series key (``labels``, if given, gets each key's labels)."""
    try:
        resp = await client.get(f"{base_url.rstrip('/')}/api/v1/query", params={"query": query, "time": f"{at:.3f}"},
                                timeout=10.0)
        body = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise PrometheusQueryError(f"cannot query {base_url} for {query!r}: {e!r}") from e
    if body.get("status") != "success":
        raise PrometheusQueryError(f"{base_url} refused {query!r}: {body.get('error', resp.text[:300])}")
    if body["data"]["resultType"] != "vector":
        raise PrometheusQueryError(f"{query!r} is a {body['data']['resultType']}, not an instant vector of counters")
    if labels is not None:
        labels.update({_key(r["metric"]): r["metric"] for r in body["data"]["result"]})
    return {_key(r["metric"]): float(r["value"][1]) for r in body["data"]["result"]}


async def _samples(client: httpx.AsyncClient, base_url: str, query: str, t: float, interval_s: float,
                   labels: dict[str, dict[str, str]]) -> dict[str, list[tuple[float, float]]] | None:
    """Raw samples of ``query`` (a selector) within two scrape intervals either side of ``t``; None if ``query``
    cannot be a range selector (an expression: the caller evaluates it as an instant vector instead)."""
    reach = max(2.5 * interval_s, 1.0)
    try:
        resp = await client.get(f"{base_url.rstrip('/')}/api/v1/query",
                                params={"query": f"{query}[{reach * 2:.3f}s]", "time": f"{t + reach:.3f}"},
                                timeout=10.0)
        body = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise PrometheusQueryError(f"cannot query {base_url} for {query!r}: {e!r}") from e
    if body.get("status") != "success" or body["data"]["resultType"] != "matrix":
        return None
    out = {}
    for r in body["data"]["result"]:
        labels[_key(r["metric"])] = r["metric"]
        out[_key(r["metric"])] = [(float(ts), float(v)) for ts, v in r["values"]]
    return out


def _at(samples: list[tuple[float, float]], t: float) -> tuple[float, float] | None:
    """The counter at ``t``: linear between the samples either side; past the last one, on at the last slope
    (or held). Returns (value, seconds from ``t`` to the nearest sample used)."""
    before = [p for p in samples if p[0] <= t]
    after = [p for p in samples if p[0] > t]
    if not before:
        return None
    (ta, va) = before[-1]
    if after and after[0][1] >= va:
        tb, vb = after[0]
        return va + (vb - va) * (t - ta) / (tb - ta), min(t - ta, tb - t)
    if len(before) >= 2 and before[-1][1] >= before[-2][1] and not after:
        (tp, vp) = before[-2]
        return va + (va - vp) / (ta - tp) * (t - ta), t - ta
    return va, t - ta


async def increase(client: httpx.AsyncClient, base_url: str, query: str, t0: float, t1: float,
                   interval_s: float = math.nan) -> PromIncrease:
    """The counters' increase over [t0, t1] (wall-clock seconds).

    For a selector, from its raw samples: each edge's value is interpolated between the samples either side of it
    (extrapolated at the last slope where none follows yet). For an expression, evaluated as an instant vector at
    each edge and rescaled to the window from the samples' own timestamps (``timestamp(query)``)."""
    labels: dict[str, dict[str, str]] = {}
    guess = interval_s if interval_s > 0 else 15.0
    raw0 = await _samples(client, base_url, query, t0, guess, labels)
    raw1 = await _samples(client, base_url, query, t1, guess, labels) if raw0 is not None else None
    out = PromIncrease()
    if raw0 is not None and raw1 is not None:
        for key in sorted(set(raw0) | set(raw1)):
            a, b = _at(raw0.get(key, []), t0), _at(raw1.get(key, []), t1)
            if a is None or b is None or b[0] < a[0]:
                out.dropped.append(key)
                continue
            out.per_series[key] = b[0] - a[0]
            out.provenance[key] = labels.get(key, {}).get("provenance", "unknown")
        out.span_s = t1 - t0
        return out
    v0, v1 = await instant(client, base_url, query, t0), await instant(client, base_url, query, t1, labels)
    s0 = await instant(client, base_url, f"timestamp({query})", t0)
    s1 = await instant(client, base_url, f"timestamp({query})", t1)
    spans = []
    for key in sorted(set(v0) | set(v1)):
        if key not in v0 or key not in v1 or v1[key] < v0[key]:
            out.dropped.append(key)
            continue
        span = s1.get(key, t1) - s0.get(key, t0)
        scale = (t1 - t0) / span if span > 0 else 1.0
        out.per_series[key] = (v1[key] - v0[key]) * scale
        out.provenance[key] = labels.get(key, {}).get("provenance", "unknown")
        spans.append(span)
    out.span_s = sum(spans) / len(spans) if spans else math.nan
    return out


async def scrape_interval_s(client: httpx.AsyncClient, base_url: str) -> float:
    """The largest scrape interval of the Prometheus's active targets (NaN where it does not say)."""
    try:
        resp = await client.get(f"{base_url.rstrip('/')}/api/v1/targets", params={"state": "active"}, timeout=10.0)
        targets = resp.json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        raise PrometheusQueryError(f"cannot list the targets of {base_url}: {e!r}") from e
    intervals = [_duration_s(t["scrapeInterval"]) for t in targets if t.get("scrapeInterval")]
    return max(intervals) if intervals else math.nan


def _duration_s(text: str) -> float:
    """A Prometheus duration (``15s``, ``100ms``, ``1m30s``) in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        c = text[i]
        if c.isdigit() or c == ".":
            number += c
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else c
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total
