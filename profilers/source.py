"""The power-source protocol every meter (NVML, RAPL, emulated devices) implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from profilers.types import DeviceInfo, PowerReading


@runtime_checkable
class PowerSource(Protocol):
    def devices(self) -> list[DeviceInfo]: ...

    def read(self) -> list[PowerReading]:
        """One reading per device, cumulative energy in joules."""
        ...
