"""The power-source protocol every meter (NVML, RAPL, emulated devices) implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from profilers.types import DeviceInfo, PowerReading


@runtime_checkable
class PowerSource(Protocol):
    """Where device energy comes from (NVML, RAPL, a model, an emulator): devices and cumulative readings."""

    def devices(self) -> list[DeviceInfo]:
        """The devices this source reads, with how each one's energy is obtained."""

    def read(self) -> list[PowerReading]:
        """One reading per device, cumulative energy in joules."""
        ...
