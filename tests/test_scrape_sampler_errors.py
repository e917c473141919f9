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


def test_engine_token_counters_are_scraped_and_become_window_shares() -> None:
    """What the exporter writes for the prefix cache and speculation reaches a campaign's point as two shares of
    the window's growth, summed over replicas; a replica without a prefix cache adds nothing to that share."""
    import math

    from workloads.results import engine_token_shares

    def scrape(hit: int, queried: int, accepted: int, proposed: int) -> dict[str, float]:
        snap = ExportSnapshot([], [
            ReplicaSample("r0", "vllm", 1, 2, 3.0, 4.0, 5.0, 0, 0, spec_proposed_tokens=proposed,
                          spec_accepted_tokens=accepted, prefix_cache_queried_tokens=queried,
                          prefix_cache_hit_tokens=hit),
            ReplicaSample("r1", "emulated", 1, 2, 3.0, 4.0, 5.0, 0, 0),
        ])
        registry, _ = build_registry(lambda: snap, load_site_profile("azure"))
        return parse_counters(registry.render().decode()).engine_tokens

    begin, end = scrape(100, 400, 10, 30), scrape(400, 800, 40, 90)
    assert begin["r0/prefix_cache_hit"] == 100 and begin["r1/spec_proposed"] == 0
    assert "r1/prefix_cache_queried" not in begin
    shares = engine_token_shares(begin, end)
    assert shares["prefix_cache_hit_ratio"] == 300 / 400 and shares["spec_acceptance_ratio"] == 30 / 60
    still = engine_token_shares(end, end)
    assert math.isnan(still["prefix_cache_hit_ratio"]) and math.isnan(still["spec_acceptance_ratio"])
