"""The HTTP target: a campaign driving an OpenAI-compatible URL, its /metrics and its control API in real time."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from profilers.clock import RealClock
from profilers.errors import ConfigError, TestbedError
from profilers.meter import CounterSample, Measurement
from profilers.promread import (
    DEFAULT_ENERGY_QUERY,
    DEFAULT_TOKEN_QUERY,
    PrometheusQueryError,
    increase,
    instant,
    scrape_interval_s,
)
from profilers.sampler import PowerIntegrator
from profilers.scrape import (
    AUTO_ENERGY_FAMILIES,
    ENERGY_FAMILIES,
    TOKEN_FAMILIES,
    CounterSnapshot,
    MetricsUnavailableError,
    ascrape_counters,
    found_energy_families,
    metric_names,
    parse_counters,
    select_sources,
)
from workloads.campaign import Setting, WindowReading, Work
from workloads.client import ClosedLoop, LoadClient, RequestRecord
from workloads.inputs import Prompts, campaign_prompts
from workloads.spec import CampaignSpec, MeteringSpec, PolicySetting, setting_label

log = logging.getLogger(__name__)
# The control API answers once the knobs are in effect, and a vLLM knob restarts the engines first (minutes for a
# large model): the campaign's usual 10 s HTTP timeout would give up on a change that is still under way.
KNOB_APPLY_TIMEOUT_S = 1200.0


class ControlError(TestbedError, RuntimeError):
    """The target's control API refused or is missing, so the sweep's settings cannot be applied."""


def snapshots_keys(family: str, snaps: list[CounterSnapshot]) -> set[str]:
    """Every series key of ``family`` in ``snaps`` (DCGM's power-only GPUs too)."""
    keys = {k for s in snaps for k in s.energy_families.get(family, {})}
    return keys | ({k for s in snaps for k in s.power_families.get("dcgm", {})} if family == "dcgm" else set())


class ModelNotServedError(ConfigError):
    """The server's /v1/models does not list the campaign's model."""


class MeteringError(ConfigError):
    """An energy or token endpoint that cannot be used as given: refused before any load is sent."""


def _families_found(text: str) -> str:
    """The metric families an exposition holds, for a refusal that says what was there (the first 25)."""
    names = metric_names(text)
    listed = f"{', '.join(names[:25]) or '(none)'}{' ...' if len(names) > 25 else ''}"
    return f"{len(names)} metric famil{'y' if len(names) == 1 else 'ies'}: {listed}"


def _accepted(families: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in families.items())


class HttpTarget:
    """An OpenAI-compatible base URL, where its energy counters are, and its control API (for knobs and policies).

    ``prompts``: how prompt text is rendered (default: the campaign's tokenizer, :func:`campaign_prompts`).
    """

    def __init__(
        self, base_url: str, metrics_url: str | None = None, control_token: str | None = None,
        prompts: Prompts | None = None, metering: MeteringSpec | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.metering = metering if metering is not None and (
            metering.energy_metrics or metering.token_metrics or metering.prometheus) else None
        self._prom_interval_s = float("nan")
        self._energy_family = "ours"
        self._token_family: str | None = None
        self._own_token_urls: list[str] = []
        """Without --token-metrics: the target's /metrics where it exports our token counter (testbed serve)."""
        self._integrator = PowerIntegrator()
        self.metrics_url = metrics_url or f"{self.base_url}/metrics"
        self.control_token = control_token
        self.prompts = prompts
        self.clock = RealClock()
        self.label = base_url
        self._http: httpx.AsyncClient | None = None
        self._client: LoadClient | None = None
        self._initial_policy: str | None = None

    async def start(self, spec: CampaignSpec) -> dict[str, object]:
        """Find the served model (unless the campaign names it) and, for a sweep of settings, the policy to restore."""
        self._http = httpx.AsyncClient(timeout=10.0)
        prompts = self.prompts or campaign_prompts(spec)
        model = await self._model_name(spec.model)
        if self.metering is not None:
            await self._check_metering(self.metering)
        w = spec.workload
        self._client = LoadClient(self.base_url, model, w.max_concurrency, w.request_timeout_s,
                                   processes=w.client_processes, prompt_fn=prompts.fn)
        if spec.sweep.knobs or spec.sweep.policies:
            self._initial_policy = await self._current_policy()
        return {"tokenizer": prompts.tokenizer}

    async def stop(self) -> None:
        """Restore the policy the target had before the sweep, then close the connections."""
        try:
            if self._initial_policy is not None:
                await self.apply(PolicySetting(policy=self._initial_policy))
        finally:
            if self._client is not None:
                self._client.close()
            if self._http is not None:
                await self._http.aclose()

    async def counters(self) -> CounterSnapshot | None:
        """The target's ``/metrics`` counters now, or None (logged) when they cannot be scraped."""
        assert self._http is not None
        if self.metering is None:
            try:
                return await ascrape_counters(self.metrics_url, self._http)
            except MetricsUnavailableError as e:
                log.warning("%s", e)
                return None
        m = self.metering
        if m.prometheus:  # the window is read afterwards (read_window): only the edges' wall-clock times matter
            return CounterSnapshot({}, {}, wall_time_s=time.time())
        energy_urls = m.energy_metrics or [self.metrics_url]
        token_urls = m.token_metrics or self._own_token_urls
        urls = list(dict.fromkeys([*energy_urls, *token_urls]))
        snaps = dict(zip(urls, await asyncio.gather(*(self._scrape(u) for u in urls)), strict=True))
        t = self.clock.now()
        integrated: dict[str, CounterSample] = {}
        if self._energy_family == "dcgm":  # GPUs without the energy counter: their power, integrated
            for url in energy_urls:
                snap = snaps[url]
                with_counter = snap.energy_families.get("dcgm", {})
                for key, watts in snap.power_families.get("dcgm", {}).items():
                    if key not in with_counter:
                        integrated[key] = CounterSample(self._integrator.add(key, t, watts), "measured")
        family = self._energy_family if m.energy_metrics else "ours"
        token_family = self._token_family if m.token_metrics else ("ours" if self._own_token_urls else None)
        return select_sources([(u, snaps[u]) for u in energy_urls], [(u, snaps[u]) for u in token_urls],
                              family, token_family, integrated, m.energy_series)

    async def _scrape(self, url: str) -> CounterSnapshot:
        """One endpoint's counters; a failure gives an empty snapshot that says why (the point is degraded)."""
        assert self._http is not None
        try:
            resp = await self._http.get(url, timeout=5.0)
            if resp.status_code != 200:
                raise MetricsUnavailableError(f"HTTP {resp.status_code}")
            return parse_counters(resp.text, origin=urlsplit(url).netloc)
        except (httpx.HTTPError, MetricsUnavailableError, ValueError) as e:
            log.warning("cannot scrape %s: %r", url, e)
            return CounterSnapshot({}, {}, scrape_errors={url: repr(e)})

    async def _fetch_text(self, url: str, what: str) -> str:
        assert self._http is not None
        try:
            resp = await self._http.get(url, timeout=10.0)
        except httpx.HTTPError as e:
            raise MeteringError(f"{what} {url} cannot be scraped ({e!r}): is it running and reachable?") from e
        if resp.status_code != 200:
            raise MeteringError(f"{what} {url} answered HTTP {resp.status_code}")
        return resp.text

    async def read_window(self, begin: CounterSnapshot, end: CounterSnapshot, window_s: float) -> WindowReading | None:
        """The point's energy and tokens through Prometheus, between the edges' wall-clock times (None: not in
        Prometheus mode, the edges' snapshots are differenced as usual)."""
        m = self.metering
        if m is None or not m.prometheus:
            return None
        assert self._http is not None
        # The sample after the end edge (for interpolation), and a scrape under way appended once it finishes.
        interval = self._prom_interval_s if self._prom_interval_s > 0 else 0.0
        await asyncio.sleep(min(interval, 30.0) + 0.25)
        e_query, t_query = m.energy_query or DEFAULT_ENERGY_QUERY, m.token_query or DEFAULT_TOKEN_QUERY
        notes: list[str] = []
        t0, t1 = begin.wall_time_s, end.wall_time_s
        try:
            energy = await increase(self._http, m.prometheus, e_query, t0, t1, self._prom_interval_s)
        except PrometheusQueryError as e:
            energy = None
            notes.append(f"energy unavailable: {e}")
        try:
            tokens = await increase(self._http, m.prometheus, t_query, t0, t1, self._prom_interval_s)
        except PrometheusQueryError as e:
            tokens = None
            notes.append(f"server token count unavailable ({e}): the clients' count is used")
        measurement = Measurement(duration_s=window_s)
        uncertainty = float("nan")
        if energy is not None:
            measurement.energy_j = dict(energy.per_series)
            measurement.provenance = dict(energy.provenance)
            measurement.dropped_devices = list(energy.dropped)
            if window_s > 0 and energy.per_series:
                uncertainty = energy.total / window_s * self._prom_interval_s
        n_tokens = None
        if tokens is not None and tokens.per_series and not tokens.dropped:
            n_tokens = round(tokens.total)
        elif tokens is not None and tokens.dropped:
            notes.append(f"token series {', '.join(tokens.dropped)} reset or missing at an edge: the clients' count "
                         "is used")
        where = f"prometheus: {m.prometheus} increase({e_query}) at the window's edges"
        if not math.isnan(self._prom_interval_s):
            where += f" (scrape interval {self._prom_interval_s:g} s)"
        return WindowReading(measurement, n_tokens, notes, where, f"prometheus: {m.prometheus} {t_query}",
                             uncertainty, "prometheus")

    async def _check_prometheus(self, m: MeteringSpec) -> None:
        assert self._http is not None and m.prometheus is not None
        query = m.energy_query or DEFAULT_ENERGY_QUERY
        try:
            found = await instant(self._http, m.prometheus, query, time.time())
            self._prom_interval_s = await scrape_interval_s(self._http, m.prometheus)
        except PrometheusQueryError as e:
            raise MeteringError(str(e)) from e
        if not found:
            raise MeteringError(
                f"{m.prometheus} has no series for the energy query {query!r} now: is it scraping the meter (or "
                "the exporter)? Pass --energy-query for another exporter's counters (in joules)"
            )

    async def _check_metering(self, m: MeteringSpec) -> None:
        """Refuse, before any load, endpoints with none of the families we read, and two energy families that may
        meter the same devices (counting both would double count) unless one is chosen."""
        if m.prometheus:
            await self._check_prometheus(m)
            return
        found: dict[str, list[str]] = {}
        energy_snaps: list[CounterSnapshot] = []
        for url in m.energy_metrics:
            text = await self._fetch_text(url, "--energy-metrics")
            energy_snaps.append(parse_counters(text, origin=urlsplit(url).netloc))
            families = found_energy_families(energy_snaps[-1])
            if not families:
                raise MeteringError(
                    f"--energy-metrics {url} exposes none of the energy families a campaign reads; it has "
                    f"{_families_found(text)}. Accepted: {_accepted(ENERGY_FAMILIES)}"
                )
            for f in families:
                found.setdefault(f, []).append(url)
        if m.energy_metrics:
            self._energy_family = self._choose(found, m.energy_family, "energy", ENERGY_FAMILIES, AUTO_ENERGY_FAMILIES)
            if lacking := [u for u in m.energy_metrics if u not in found[self._energy_family]]:
                raise MeteringError(
                    f"--energy-metrics {', '.join(lacking)} expose(s) no {self._energy_family} counters (the family "
                    f"chosen): each endpoint must meter with the same family, or drop it"
                )
            if m.energy_series is not None:
                keys = sorted(k for k in snapshots_keys(self._energy_family, energy_snaps))
                if not any(re.fullmatch(m.energy_series, k) for k in keys):
                    raise MeteringError(
                        f"--energy-series {m.energy_series!r} matches none of the {self._energy_family} series: "
                        f"{', '.join(keys[:40])}"
                    )
        found = {}
        for url in m.token_metrics:
            text = await self._fetch_text(url, "--token-metrics")
            snap = parse_counters(text, origin=urlsplit(url).netloc)
            families = [f for f in TOKEN_FAMILIES if snap.token_families.get(f)]
            if not families:
                raise MeteringError(
                    f"--token-metrics {url} exposes no generated-token counter we read; it has "
                    f"{_families_found(text)}. Accepted: {_accepted(TOKEN_FAMILIES)}"
                )
            for f in families:
                found.setdefault(f, []).append(url)
        if m.token_metrics:
            self._token_family = self._choose(found, m.token_family, "token", TOKEN_FAMILIES, tuple(TOKEN_FAMILIES))
        elif (await self._scrape(self.metrics_url)).token_families.get("ours"):
            self._own_token_urls = [self.metrics_url]
        else:
            log.warning("no --token-metrics and %s exports no llm_energy_tokens_total: output tokens are the "
                        "clients' count of the responses' usage (points.csv: token_source)", self.metrics_url)

    @staticmethod
    def _choose(found: dict[str, list[str]], chosen: str | None, what: str, known: dict[str, str],
                auto: tuple[str, ...]) -> str:
        where = "; ".join(f"{f} at {', '.join(urls)}" for f, urls in found.items())
        flag = f"--{what}-family (metering.{what}_family)"
        if chosen is not None:
            if chosen not in found:
                raise MeteringError(f"{flag} {chosen}: no endpoint exposes it; found {where}")
            return chosen
        candidates = [f for f in found if f in auto]
        if not candidates:
            raise MeteringError(f"found only {where}, which is used when chosen: pass {flag} {next(iter(found))}")
        if len(candidates) > 1:
            raise MeteringError(
                f"more than one {what} source: {where}. They may count the same devices (or requests), and adding "
                f"them would count them twice: choose one with {flag} ({', '.join(candidates)})"
            )
        return candidates[0]

    async def apply(self, setting: Setting) -> None:
        """POST the knobs or policy to the control API; None leaves the deployment as it is."""
        if setting is None:
            return
        assert self._http is not None
        path = "/control/policy" if isinstance(setting, PolicySetting) else "/control/knobs"
        url = f"{self.base_url}{path}"
        headers = {"authorization": f"Bearer {self.control_token}"} if self.control_token else {}
        try:
            resp = await self._http.post(url, json=setting.model_dump(exclude_none=True), headers=headers,
                                         timeout=KNOB_APPLY_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise ControlError(f"cannot apply {setting_label(setting)} at {url}: {e!r}") from e
        if resp.status_code == 401:
            raise ControlError(
                f"{url} refused the control token: pass --control-token (or TESTBED_CONTROL_TOKEN) with the token "
                "the deployment printed at start-up"
            )
        if resp.status_code != 200:
            raise ControlError(f"{url} refused {setting_label(setting)}: HTTP {resp.status_code} {resp.text[:300]}")

    async def send(
        self, point: int, work: Work, seed: int, on_done: Callable[[RequestRecord], None],
        on_start: Callable[[float], None],
    ) -> list[RequestRecord]:
        """Send a point (open-loop schedule or closed-loop users) through the load client; returns the records."""
        assert self._client is not None

        def started(t0_perf: float) -> None:  # the load client's clock is perf_counter: convert to ours
            on_start(self.clock.now() + (t0_perf - time.perf_counter()))

        if isinstance(work, ClosedLoop):
            return await self._client.run_closed(point, work, seed, on_done, started)
        return await self._client.run(point, work, seed, on_done, started)

    async def _model_name(self, wanted: str | None) -> str:
        """``wanted`` if the server serves it (or cannot list its models), else its first model; a server that
        lists its models without ``wanted`` is refused with the names it serves."""
        assert self._http is not None
        try:
            resp = await self._http.get(f"{self.base_url}/v1/models")
            resp.raise_for_status()
            served = [str(m["id"]) for m in resp.json()["data"]]
            if not served and wanted is None:
                raise IndexError("no model listed")
        except (httpx.HTTPError, KeyError, IndexError, ValueError, TypeError) as e:
            if wanted is not None:
                return wanted
            raise ControlError(
                f"cannot list models at {self.base_url}/v1/models ({e!r}); set `model:` in the campaign"
            ) from e
        if wanted is None:
            return served[0]
        if wanted not in served:
            raise ModelNotServedError(
                f"{self.base_url} does not serve the campaign's model {wanted!r}; it serves: {', '.join(served)}. "
                "Set `model:` to one of them"
            )
        return wanted

    async def _current_policy(self) -> str:
        assert self._http is not None
        url = f"{self.base_url}/control"
        try:
            resp = await self._http.get(url)
        except httpx.HTTPError as e:
            raise ControlError(f"cannot read {url} ({e!r}): the sweep sets knobs or policies through it") from e
        if resp.status_code != 200:
            raise ControlError(
                f"{url} answered HTTP {resp.status_code}: the target has no control API, so the sweep's knobs and "
                "policies cannot be applied (serve it with `testbed serve`, controller enabled)"
            )
        return str(resp.json()["policy"])
