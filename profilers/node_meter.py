"""``testbed meter``: a node energy exporter that runs beside any serving stack.

It chooses its power source as a replica does (:func:`profilers.sources.probe_sources`: NVML, then RAPL, then the
CPU power model of the watched process trees) and exports the replicas' device families through the same
collector (:class:`profilers.exporter.EnergyCollector`): ``llm_energy_energy_joules_total``,
``llm_energy_power_watts``, ``llm_energy_clock_mhz`` with labels ``replica`` (the node's name), ``device``,
``backend`` and ``provenance``. A source that fails mid-run does not stop the meter: the last good counters stay
exported (never a silent zero), ``llm_energy_sampler_errors_total`` rises, ``llm_energy_meter_up`` drops to 0 and
``llm_energy_meter_error_info`` says why, so a campaign point over that window is ``degraded`` with the reason.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from profilers.cpu_model import CpuPowerModel
from profilers.exporter import DeviceSample, EnergyCollector, ExportSnapshot
from profilers.exposition import ExporterRegistry, Family, FastCollector
from profilers.footprint import SiteProfile, load_site_profile
from profilers.source import PowerSource
from profilers.sources import METER_ORDER, probe_sources
from profilers.types import PowerReading

log = logging.getLogger(__name__)
# Beside dcgm-exporter (9400) and the node agent (9401) on the same node.
DEFAULT_PORT = 9402
ERROR_TEXT_MAX = 200


@dataclass(frozen=True)
class MeterStatus:
    """The meter's health: whether its last read worked, how many reads it made and how many failed, and why."""

    up: bool
    samples: int
    errors_total: int
    last_error: str | None


def choose_source(
    pids: Sequence[int] = (), gpus: str | None = None, order: Sequence[str] = METER_ORDER,
    idle_w: float = 10.0, core_w: float = 12.0,
) -> tuple[PowerSource, str]:
    """The node's power source, probed as a replica probes it; the CPU model watches ``pids`` (default: none
    given, this process, which measures nothing useful: the CLI insists on ``--pid`` for the model).

    ``gpus``: a ``CUDA_VISIBLE_DEVICES`` value naming the GPUs to read (default: the environment's; unset: all)."""
    visible = gpus if gpus is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    options = {"nvml": {"visible_devices": visible}} if visible is not None else None
    roots = list(pids) or None
    fallback = ("cpu_model", lambda: CpuPowerModel(idle_w, core_w, pid=roots))
    choice = probe_sources(order=order, fallback=fallback, options=options)
    detail = getattr(choice.source, "describe", None)
    text = detail() if callable(detail) else choice.provenance
    if choice.skipped:
        text += f" [not used: {'; '.join(choice.skipped)}]"
    return choice.source, text


class NodeMeter:
    """Reads ``source`` every ``interval_s`` in a thread and at every scrape; keeps the last good reading per
    device, so a failing source leaves the counters where they were and says so (errors, up, the reason)."""

    def __init__(
        self, source: PowerSource, node: str | None = None, interval_s: float = 1.0, description: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"the sampling interval must be positive, got {interval_s} s")
        self.source = source
        self.node = node or socket.gethostname()
        self.interval_s = interval_s
        self.description = description
        self._clock = clock
        self._infos = {d.device: d for d in source.devices()}
        self._latest: dict[str, PowerReading] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = 0
        self._errors = 0
        self._last_error: str | None = None
        self._up = False
        self._last_t = -1e18
        self.sample()

    # --- reading ---------------------------------------------------------------------------------
    def sample(self) -> None:
        """One read of the source; a failure is counted and recorded, never raised (the meter stays up)."""
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        self._last_t = self._clock()
        gone = self.source.gone() if isinstance(self.source, CpuPowerModel) else []
        try:
            readings = self.source.read()
        except Exception as e:  # the source's boundary: an NVML error, a vanished device
            self._fail(f"{type(e).__name__}: {e}")
            return
        for r in readings:
            self._latest[r.device] = r
        self._samples += 1
        if gone:
            self._fail(f"watched process(es) {', '.join(map(str, gone))} exited: the CPU model now meters only "
                       "what is left of the trees")
            return
        self._up = True

    def _fail(self, error: str) -> None:
        self._errors += 1
        self._up = False
        self._last_error = error[:ERROR_TEXT_MAX]
        log.warning("meter: read failed (%d so far): %s", self._errors, self._last_error)

    def status(self) -> MeterStatus:
        """The meter's health now (for ``llm_energy_meter_up`` and ``llm_energy_meter_error_info``)."""
        with self._lock:
            return MeterStatus(self._up, self._samples, self._errors, self._last_error)

    def snapshot(self, max_age_s: float = 0.05) -> ExportSnapshot:
        """The exporter's view: a fresh read unless one was taken within ``max_age_s`` (window edges are exact
        to the scrape, not to the sampling interval)."""
        with self._lock:
            if self._clock() - self._last_t >= max_age_s:
                self._sample_locked()
            snap = ExportSnapshot()
            for dev, r in self._latest.items():
                info = self._infos.get(dev)
                snap.devices.append(DeviceSample(
                    self.node, dev, info.backend if info else "unknown", str(r.provenance), r.energy_j, r.power_w,
                    r.clock_mhz, sampler_errors=self._errors,
                ))
            return snap

    # --- thread ----------------------------------------------------------------------------------
    def start(self) -> NodeMeter:
        """Start the background reads (every ``interval_s``); returns the meter."""
        self._thread = threading.Thread(target=self._run, name="node-meter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background reads and close the source."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        close = getattr(self.source, "close", None)
        if callable(close):
            close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._clock() - self._last_t >= self.interval_s / 2:  # a scrape just read it
                    self._sample_locked()


class MeterStatusCollector(FastCollector):
    """``llm_energy_meter_up`` (1: the last read worked), ``llm_energy_meter_error_info`` (the last error)."""

    def __init__(self, meter: NodeMeter) -> None:
        self.meter = meter

    def families(self) -> list[Family]:
        """The meter's up gauge, its last error and what it reads, as exposition families."""
        st = self.meter.status()
        up = Family("llm_energy_meter_up", "1 if the meter's last read of its power source worked, else 0 "
                    "(see llm_energy_meter_error_info).", "gauge", ["replica"])
        up.add([self.meter.node], 1.0 if st.up else 0.0)
        info = Family("llm_energy_meter_error_info", "The meter's last failed read (value 1), while it is down.",
                      "gauge", ["replica", "error"])
        if not st.up and st.last_error:
            info.add([self.meter.node, st.last_error], 1.0)
        source = Family("llm_energy_meter_source_info", "What the meter reads (value 1).", "gauge",
                        ["replica", "source"])
        source.add([self.meter.node, self.meter.description[:ERROR_TEXT_MAX * 2]], 1.0)
        return [up, info, source]


def meter_registry(meter: NodeMeter, site: SiteProfile | None = None) -> ExporterRegistry:
    """The meter's ``/metrics``: the replicas' energy collector over the meter's snapshot, and its status."""
    registry = ExporterRegistry()
    registry.register(EnergyCollector(meter.snapshot, site or load_site_profile("azure")))
    registry.register(MeterStatusCollector(meter))
    return registry


def serve_metrics(registry: ExporterRegistry, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """An HTTP server answering ``GET /metrics`` (call ``serve_forever()``; port 0: any free port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            body = registry.render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
