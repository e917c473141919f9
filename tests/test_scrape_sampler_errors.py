"""Sampler errors travel from the exporter to whoever scrapes it (the campaign)."""

from __future__ import annotations

from profilers.exporter import DeviceSample, ExportSnapshot, ReplicaSample, build_registry
from profilers.footprint import load_site_profile
from profilers.scrape import parse_counters


def test_sampler_errors_are_scraped_per_device() -> None:
    snap = ExportSnapshot(
        [DeviceSample("r0", "gpu0", "nvml", "measured", 10.0, 100.0, None, 7),
         DeviceSample("r0", "gpu1", "nvml", "measured", 12.0, 100.0, None)],
        [ReplicaSample("r0", "nvml", 1, 2, 3.0, 4.0, 5.0, 0, 0)],
    )
    registry, _ = build_registry(lambda: snap, load_site_profile("azure"))
    counters = parse_counters(registry.render().decode())
    assert counters.sampler_errors == {"r0/gpu0": 7.0}
    assert set(counters.energy) == {"r0/gpu0", "r0/gpu1"}
