"""A background thread that polls a power source at a fixed rate.

It keeps a bounded history per device and integrates sampled power for devices that have no energy
counter. A sampler that dies is visible (``status().alive``, an error count for the exporter, and
:class:`SamplerDiedError` from :meth:`Sampler.latest`): its energy is never reported as a silent zero.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from profilers.errors import SamplerDiedError
from profilers.source import PowerSource
from profilers.types import PowerReading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerStatus:
    """State of a sampling thread: alive or not, samples taken, errors, last error, CPU time used."""

    alive: bool
    samples: int
    errors_total: int
    last_error: str | None
    cpu_s: float
    """CPU time the sampling thread has used (for its overhead)."""


class PowerIntegrator:
    """Trapezoidal integral of sampled power, per device, in joules."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}
        self.energy_j: dict[str, float] = {}

    def add(self, device: str, t_s: float, power_w: float) -> float:
        """Add a power sample (W) at ``t_s``; returns the device's energy so far (J); late samples add nothing."""
        last = self._last.get(device)
        energy = self.energy_j.get(device, 0.0)
        if last is None or t_s > last[0]:  # a sample out of order adds nothing rather than negative energy
            if last is not None:
                energy += (t_s - last[0]) * (last[1] + power_w) / 2.0
            self._last[device] = (t_s, power_w)
            self.energy_j[device] = energy
        return energy


class Sampler:
    """Polls ``source.read()`` at ``hz`` in a daemon thread.

    Args:
        source: what to poll.
        hz: samples per second.
        history: readings kept per device.
        integrate: devices whose ``energy_j`` is replaced by the integral of their sampled power
            (sources with no energy counter).
        max_consecutive_errors: failed reads in a row after which the thread gives up and is dead.
        clock: monotonic seconds, for pacing.
    """

    def __init__(
        self,
        source: PowerSource,
        hz: float = 10.0,
        history: int = 1024,
        integrate: Collection[str] = (),
        max_consecutive_errors: int = 5,
        clock: Callable[[], float] = time.monotonic,
        name: str = "power-sampler",
    ) -> None:
        if hz <= 0:
            raise ValueError(f"sampling rate must be positive, got {hz} Hz")
        self.source = source
        self.period_s = 1.0 / hz
        self._integrate = frozenset(integrate)
        self._integrator = PowerIntegrator()
        self._max_errors = max_consecutive_errors
        self._clock = clock
        self._history: dict[str, deque[PowerReading]] = {}
        self._history_len = history
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._samples = 0
        self._errors = 0
        self._last_error: str | None = None
        self._dead = False
        self._cpu_s = 0.0

    def start(self) -> Sampler:
        """Take a first reading here (a broken source fails loudly), then start the sampling thread."""
        self.sample_once()  # the first reading is taken in the caller, so a broken source fails loudly here
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the sampling thread to stop and wait up to ``timeout_s`` for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sample_once(self) -> list[PowerReading]:
        """Read the source once, integrating power where asked, and keep the readings in the history."""
        readings = self.source.read()
        out = []
        for r in readings:
            if r.device in self._integrate:
                r = dataclasses.replace(r, energy_j=self._integrator.add(r.device, r.t_s, r.power_w))
            out.append(r)
        with self._lock:
            for r in out:
                self._history.setdefault(r.device, deque(maxlen=self._history_len)).append(r)
            self._samples += 1
        return out

    def status(self) -> SamplerStatus:
        """The sampling thread's state now."""
        with self._lock:
            alive = not self._dead and (self._thread.is_alive() or not self._stop.is_set())
            return SamplerStatus(alive, self._samples, self._errors, self._last_error, self._cpu_s)

    def raise_if_dead(self) -> None:
        """Raise SamplerDiedError if the thread gave up: energy after that moment is unknown."""
        if self._dead:
            raise SamplerDiedError(
                f"power sampler of {type(self.source).__name__} stopped after {self._errors} errors "
                f"(last: {self._last_error}); energy after that moment is unknown"
            )

    def latest(self) -> list[PowerReading]:
        """The newest reading of every device."""
        self.raise_if_dead()
        with self._lock:
            return [h[-1] for h in self._history.values() if h]

    def history(self, device: str) -> list[PowerReading]:
        """The device's recent readings, oldest first."""
        with self._lock:
            return list(self._history.get(device, ()))

    def _run(self) -> None:
        consecutive = 0
        next_t = self._clock() + self.period_s
        while not self._stop.wait(max(0.0, next_t - self._clock())):
            try:
                self.sample_once()
                consecutive = 0
            except Exception as e:  # the thread boundary: record every failure, give up after a run of them
                consecutive += 1
                with self._lock:
                    self._errors += 1
                    self._last_error = f"{type(e).__name__}: {e}"
                log.warning("power sampler: read failed (%d in a row): %s", consecutive, self._last_error)
                if consecutive >= self._max_errors:
                    with self._lock:
                        self._dead = True
                    log.error("power sampler gave up after %d failed reads in a row", consecutive)
                    return
            finally:
                self._cpu_s = time.thread_time()
            next_t += self.period_s
            now = self._clock()
            if next_t < now:  # missed ticks are skipped, not bunched up
                next_t = now + self.period_s
