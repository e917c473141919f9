"""The HTTP target: a campaign driving an OpenAI-compatible URL, its /metrics and its control API in real time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx

from profilers.clock import RealClock
from profilers.errors import TestbedError
from profilers.scrape import CounterSnapshot, MetricsUnavailableError, ascrape_counters
from workloads.campaign import Setting, Work
from workloads.client import ClosedLoop, LoadClient, RequestRecord
from workloads.inputs import Prompts, campaign_prompts
from workloads.spec import CampaignSpec, PolicySetting, setting_label

log = logging.getLogger(__name__)
# The control API answers once the knobs are in effect, and a vLLM knob restarts the engines first (minutes for a
# large model): the campaign's usual 10 s HTTP timeout would give up on a change that is still under way.
KNOB_APPLY_TIMEOUT_S = 1200.0


class ControlError(TestbedError, RuntimeError):
    """The target's control API refused or is missing, so the sweep's settings cannot be applied."""


class HttpTarget:
    """An OpenAI-compatible base URL, where its energy counters are, and its control API (for knobs and policies).

    ``prompts``: how prompt text is rendered (default: the campaign's tokenizer, :func:`campaign_prompts`).
    """

    def __init__(
        self, base_url: str, metrics_url: str | None = None, control_token: str | None = None,
        prompts: Prompts | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
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
        model = spec.model or await self._model_name()
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
        try:
            return await ascrape_counters(self.metrics_url, self._http)
        except MetricsUnavailableError as e:
            log.warning("%s", e)
            return None

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

    async def _model_name(self) -> str:
        assert self._http is not None
        try:
            resp = await self._http.get(f"{self.base_url}/v1/models")
            resp.raise_for_status()
            return str(resp.json()["data"][0]["id"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise ControlError(
                f"cannot list models at {self.base_url}/v1/models ({e!r}); set `model:` in the campaign"
            ) from e

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
