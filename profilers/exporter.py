"""Prometheus exporter: a collector that reads the deployment at scrape time.

Names follow ``llm_energy_<name>_<unit>``, base units, ``_total`` on counters. The device counter
``llm_energy_energy_joules_total`` has no ``phase`` label on purpose: attributed prefill/decode energy
and idle energy are separate families, so ``sum()`` over any family never double counts.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from profilers.carbon import CarbonAccumulator, CifSeries, EmbodiedCarbon, site_cif_series
from profilers.exposition import ExporterRegistry, Family, FastCollector, HistogramCollector
from profilers.footprint import SiteProfile, footprint
from profilers.lifecycle import LifecycleAccumulator

NAMESPACE = "llm_energy"
DEVICE_LABELS = ["replica", "device", "backend", "provenance"]
REPLICA_LABELS = ["replica", "backend"]
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)


def _counter(name: str, doc: str, labels: list[str]) -> Family:
    return Family(name, doc, "counter", labels)


def _gauge(name: str, doc: str, labels: list[str]) -> Family:
    return Family(name, doc, "gauge", labels)


@dataclass(frozen=True)
class DeviceSample:
    """One device's counters as exported on ``/metrics``: cumulative energy (J), power (W), clock, provenance."""

    replica: str
    device: str
    backend: str
    provenance: str
    energy_j: float
    power_w: float
    clock_mhz: float | None
    sampler_errors: int | None = None
    """Failed reads of the device's sampling thread, where one runs."""
    uptime_s: float | None = None
    """Seconds the device has been in service (for embodied carbon); else counted from the first scrape."""
    preset: str | None = None
    """Emulated devices: the preset that models it, exported with ``calibration`` on ``llm_energy_device_info``."""
    calibration: str | None = None


@dataclass(frozen=True)
class ReplicaSample:
    """One replica's counters as exported: tokens, energy attributed to prefill/decode/idle (J), load, KV cache."""

    replica: str
    backend: str
    prompt_tokens: int
    generated_tokens: int
    attributed_prefill_j: float
    attributed_decode_j: float
    idle_j: float
    running: int
    waiting: int
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    """0: the engine reports no KV cache (no usage ratio is exported)."""
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    prefix_cache_queried_tokens: int | None = None
    """None: the engine has no prefix cache (no samples are exported)."""
    prefix_cache_hit_tokens: int | None = None
    up: bool = True
    """False: the replica is dead or not answering; these are its last counters, frozen."""


@dataclass
class ExportSnapshot:
    """Everything one scrape exports: every device's and every replica's sample."""

    devices: list[DeviceSample] = field(default_factory=list)
    replicas: list[ReplicaSample] = field(default_factory=list)


class _Window:
    """Energy per generated token over a sliding window of scrapes."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.points: deque[tuple[float, float, int]] = deque()

    def update(self, t: float, energy_j: float, tokens: int) -> float | None:
        self.points.append((t, energy_j, tokens))
        while len(self.points) > 2 and t - self.points[1][0] >= self.window_s:
            self.points.popleft()
        _, e0, n0 = self.points[0]
        if tokens - n0 <= 0 or energy_j < e0:
            return None
        return (energy_j - e0) / (tokens - n0)


class EnergyCollector(FastCollector):
    """Reads a fresh :class:`ExportSnapshot` at each scrape and derives water and carbon from it."""

    def __init__(
        self,
        snapshot_fn: Callable[[], ExportSnapshot],
        site: SiteProfile,
        window_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        embodied: EmbodiedCarbon | None = None,
        cif: CifSeries | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._snapshot_fn = snapshot_fn
        self._site = site
        self._window_s = window_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self._embodied = embodied
        self._carbon = CarbonAccumulator(site, cif) if cif is not None else None
        self._wall_clock = wall_clock
        self._first_seen: dict[str, float] = {}
        self._lifecycle = LifecycleAccumulator(site)

    def families(self) -> list[Family]:
        """The energy, water and carbon metric families of a fresh snapshot, per device and per replica."""
        snap = self._snapshot_fn()
        return [*self._device_families(snap), *self._replica_families(snap)]

    def _device_families(self, snap: ExportSnapshot) -> list[Family]:
        energy = _counter(
            f"{NAMESPACE}_energy_joules", "Cumulative device energy (IT side).", labels=DEVICE_LABELS
        )
        power = _gauge(f"{NAMESPACE}_power_watts", "Device power now.", labels=DEVICE_LABELS)
        clock = _gauge(f"{NAMESPACE}_clock_mhz", "Device clock now.", labels=DEVICE_LABELS)
        water = _counter(
            f"{NAMESPACE}_water_liters",
            "Water consumed: scope=site (cooling, WUE_site x IT energy) or source (electricity, "
            "WUE_source x facility energy).",
            labels=[*DEVICE_LABELS, "scope"],
        )
        carbon = _counter(
            f"{NAMESPACE}_carbon_grams",
            "Carbon: scope=operational (CIF x facility energy) or embodied (device manufacture, amortised "
            "over its service life per second of use).",
            labels=[*DEVICE_LABELS, "scope"],
        )
        sampler_errors = _counter(
            f"{NAMESPACE}_sampler_errors",
            "Failed reads of a device's power-sampling thread (a dead sampler stops the energy counter).",
            labels=DEVICE_LABELS,
        )
        info = _gauge(  # labels, not series of their own: a campaign copies them into points.csv
            f"{NAMESPACE}_device_info",
            "Emulated devices (value 1): the preset that models the device and its calibration band.",
            labels=[*DEVICE_LABELS, "preset", "calibration"],
        )
        now, wall = self._clock(), self._wall_clock()
        for d in snap.devices:
            labels = [d.replica, d.device, d.backend, d.provenance]
            energy.add(labels, d.energy_j)
            power.add(labels, d.power_w)
            if d.clock_mhz is not None:
                clock.add(labels, d.clock_mhz)
            fp = footprint(d.energy_j, self._site)
            water.add([*labels, "site"], fp.water_site_l)
            water.add([*labels, "source"], fp.water_source_l)
            carbon.add([*labels, "operational"], self._operational_g(d, fp.carbon_g, wall))
            if self._embodied is not None:
                carbon.add([*labels, "embodied"], self._embodied.grams(self._uptime_s(d, now)))
            if d.sampler_errors is not None:
                sampler_errors.add(labels, d.sampler_errors)
            if d.preset is not None:
                info.add([*labels, d.preset, d.calibration or ""], 1.0)
        return [energy, power, clock, water, carbon, sampler_errors, info]

    def _operational_g(self, d: DeviceSample, constant_cif_g: float, wall: float) -> float:
        if self._carbon is None:
            return constant_cif_g
        with self._lock:
            return self._carbon.update(f"{d.replica}/{d.device}", d.energy_j, wall)

    def _uptime_s(self, d: DeviceSample, now: float) -> float:
        if d.uptime_s is not None:
            return d.uptime_s
        with self._lock:
            return now - self._first_seen.setdefault(f"{d.replica}/{d.device}", now)

    def _replica_families(self, snap: ExportSnapshot) -> list[Family]:
        tokens = _counter(
            f"{NAMESPACE}_tokens", "Tokens processed, kind=prompt|generated.",
            labels=[*REPLICA_LABELS, "kind"],
        )
        attributed = _counter(
            f"{NAMESPACE}_attributed_energy_joules",
            "Energy attributed to requests, by phase (prefill|decode).",
            labels=[*REPLICA_LABELS, "phase", "provenance"],
        )
        idle = _counter(
            f"{NAMESPACE}_idle_energy_joules",
            "Energy spent with no request in flight (not charged to tokens).",
            labels=[*REPLICA_LABELS, "provenance"],
        )
        per_token = _gauge(
            f"{NAMESPACE}_energy_per_token_joules",
            f"Device energy per generated token over the last {self._window_s:g} s of scrapes.",
            labels=[*REPLICA_LABELS, "provenance"],
        )
        running = _gauge(
            f"{NAMESPACE}_requests_running", "Requests in the running batch.", labels=REPLICA_LABELS
        )
        up = _gauge(
            f"{NAMESPACE}_replica_up", "1: the replica answers; 0: dead or not answering its heartbeat (its counters "
            "are its last, frozen).", labels=REPLICA_LABELS,
        )
        waiting = _gauge(
            f"{NAMESPACE}_requests_waiting", "Requests queued for admission.", labels=REPLICA_LABELS
        )
        closure = _gauge(
            f"{NAMESPACE}_attribution_error_ratio",
            "|attributed prefill + decode + idle energy - device energy| / device energy (0 = every joule "
            "accounted for).",
            labels=[*REPLICA_LABELS, "provenance"],
        )
        kv_usage = _gauge(
            f"{NAMESPACE}_kv_cache_usage_ratio", "Share of the KV cache's token slots in use, as the engine reports "
            "it.", labels=REPLICA_LABELS,
        )
        kv_capacity = _gauge(
            f"{NAMESPACE}_kv_cache_capacity_tokens", "Tokens the KV cache holds.", labels=REPLICA_LABELS
        )
        spec = _counter(
            f"{NAMESPACE}_spec_decode_tokens",
            "Speculative decoding: draft tokens proposed and accepted, kind=proposed|accepted.",
            labels=[*REPLICA_LABELS, "kind"],
        )
        prefix = _counter(
            f"{NAMESPACE}_prefix_cache_tokens",
            "Prompt tokens looked up in the prefix cache (kind=queried) and found there (kind=hit): a hit's prefill "
            "is not computed again.",
            labels=[*REPLICA_LABELS, "kind"],
        )
        boundary = _counter(
            f"{NAMESPACE}_boundary_energy_joules",
            "Energy in a boundary: accelerator (the devices' own) or comprehensive (plus the host's CPU and DRAM "
            "for the replica's share of its node, modeled from a host power preset, times PUE; absent where the "
            "host is unknown, never 0).",
            labels=[*REPLICA_LABELS, "boundary", "provenance"],
        )
        sci = _gauge(
            f"{NAMESPACE}_sci_per_token_grams",
            "GSF SCI per generated token since the replica started: ((E x I) + M) / R, E comprehensive "
            "(accelerator x PUE where the host is unknown), I location-based, M embodied; status=complete|partial.",
            labels=[*REPLICA_LABELS, "status"],
        )
        now = self._clock()
        presets_by_replica: dict[str, list[str | None]] = {}
        uptime_by_replica: dict[str, float] = {}
        for d in snap.devices:
            presets_by_replica.setdefault(d.replica, []).append(d.preset)
            uptime_by_replica[d.replica] = max(uptime_by_replica.get(d.replica, 0.0), self._uptime_s(d, now))
        energy_by_replica: dict[str, tuple[float, str]] = {}
        for d in snap.devices:
            total, prov = energy_by_replica.get(d.replica, (0.0, d.provenance))
            energy_by_replica[d.replica] = (total + d.energy_j, prov if prov == d.provenance else "mixed")
        for r in snap.replicas:
            labels = [r.replica, r.backend]
            prov = energy_by_replica.get(r.replica, (0.0, "unavailable"))[1]
            tokens.add([*labels, "prompt"], r.prompt_tokens)
            tokens.add([*labels, "generated"], r.generated_tokens)
            attributed.add([*labels, "prefill", prov], r.attributed_prefill_j)
            attributed.add([*labels, "decode", prov], r.attributed_decode_j)
            idle.add([*labels, prov], r.idle_j)
            running.add(labels, r.running)
            up.add(labels, 1.0 if r.up else 0.0)
            waiting.add(labels, r.waiting)
            if r.kv_capacity_tokens > 0:
                kv_usage.add(labels, r.kv_used_tokens / r.kv_capacity_tokens)
                kv_capacity.add(labels, r.kv_capacity_tokens)
            spec.add([*labels, "proposed"], r.spec_proposed_tokens)
            spec.add([*labels, "accepted"], r.spec_accepted_tokens)
            if r.prefix_cache_queried_tokens is not None:
                prefix.add([*labels, "queried"], r.prefix_cache_queried_tokens)
                prefix.add([*labels, "hit"], r.prefix_cache_hit_tokens or 0)
            metered = energy_by_replica.get(r.replica, (0.0, prov))[0]
            if metered > 0:
                accounted = r.attributed_prefill_j + r.attributed_decode_j + r.idle_j
                closure.add([*labels, prov], abs(accounted - metered) / metered)
            if r.replica in energy_by_replica:
                with self._lock:
                    window = self._windows.setdefault(r.replica, _Window(self._window_s))
                    value = window.update(now, energy_by_replica[r.replica][0], r.generated_tokens)
                if value is not None:
                    per_token.add([*labels, prov], value)
                with self._lock:
                    life = self._lifecycle.update(
                        r.replica, uptime_by_replica.get(r.replica, 0.0), energy_by_replica[r.replica][0],
                        r.attributed_prefill_j + r.attributed_decode_j, presets_by_replica.get(r.replica, []), prov,
                    )
                boundary.add([*labels, "accelerator", prov], life.accelerator_j)
                if math.isfinite(life.comprehensive_j):
                    boundary.add([*labels, "comprehensive", "mixed" if prov == "measured" else prov],
                                 life.comprehensive_j)
                if r.generated_tokens > 0:
                    sci.add([*labels, life.sci_status.split(":")[0]], life.sci_per(r.generated_tokens))
        return [tokens, attributed, idle, per_token, running, waiting, up, closure, kv_usage, kv_capacity, spec,
                prefix, boundary, sci]


@dataclass
class LatencyHistograms:
    """The front door's TTFT, TPOT and end-to-end latency histograms (seconds), labelled by replica."""

    ttft: HistogramCollector
    tpot: HistogramCollector
    e2e: HistogramCollector

    def observe(self, replica: str, ttft_s: float | None, tpot_s: float | None, e2e_s: float) -> None:
        """Record one finished request's latencies (s) under its replica; TTFT/TPOT only where known."""
        if ttft_s is not None:
            self.ttft.observe(replica, ttft_s)
        if tpot_s is not None:
            self.tpot.observe(replica, tpot_s)
        self.e2e.observe(replica, e2e_s)


def latency_histograms(registry: CollectorRegistry) -> LatencyHistograms:
    """Server-side latency, measured at the front door (provenance: measured wall-clock time)."""

    def make(name: str, doc: str) -> HistogramCollector:
        hist = HistogramCollector(f"{NAMESPACE}_request_{name}_seconds", doc, "replica", LATENCY_BUCKETS_S)
        registry.register(hist)
        return hist

    return LatencyHistograms(
        ttft=make("ttft", "Time to first token."),
        tpot=make("tpot", "Mean time per output token after the first."),
        e2e=make("e2e", "End-to-end request latency."),
    )


DOOR_REFUSAL_REASONS = ("in_flight", "connections", "body_too_large", "headers_too_large", "timeout")
"""Why the front door refused a request (``serving.config.DoorConfig``): 503 at the in-flight cap, 503 at the
connection cap, 413, 431, 408."""


class DoorRefusals(FastCollector):
    """Requests the front door refused at one of its limits, by reason (``llm_energy_door_refused_total``). Every
    reason is exported from the start, at 0 until it happens, so a rate over it has a series from the first scrape.
    Counted on the door's event loop (plain ints, no lock)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(DOOR_REFUSAL_REASONS, 0)

    def count(self, reason: str) -> None:
        """One more refusal for ``reason`` (one of ``DOOR_REFUSAL_REASONS``)."""
        self.counts[reason] += 1

    def families(self) -> list[Family]:
        """The counter family, one row per reason."""
        family = _counter(
            f"{NAMESPACE}_door_refused",
            "Requests the front door refused at a limit: in_flight (503, in-flight cap), connections (503, "
            "connection cap), body_too_large (413), headers_too_large (431), timeout (408).", ["reason"])
        for reason, n in self.counts.items():
            family.add([reason], n)
        return [family]


def build_registry(
    snapshot_fn: Callable[[], ExportSnapshot],
    site: SiteProfile,
    *,
    embodied: EmbodiedCarbon | None = None,
    cif: CifSeries | None = None,
    refusals: DoorRefusals | None = None,
) -> tuple[ExporterRegistry, LatencyHistograms]:
    """The deployment's registry: energy families (fast path, see :meth:`ExporterRegistry.render`), latency
    histograms and the front door's refusals (``refusals``, the door's counter; else one that stays at 0)."""
    registry = ExporterRegistry()
    cif = cif if cif is not None else site_cif_series(site)
    registry.register(EnergyCollector(snapshot_fn, site, embodied=embodied, cif=cif))
    registry.register(refusals if refusals is not None else DoorRefusals())
    return registry, latency_histograms(registry)
