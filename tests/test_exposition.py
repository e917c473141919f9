"""The fast exposition writer produces exactly what prometheus_client would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from profilers.exporter import LATENCY_BUCKETS_S, DeviceSample, ExportSnapshot, ReplicaSample, build_registry
from profilers.exposition import ExporterRegistry, Family, FastCollector, HistogramCollector
from profilers.footprint import load_site_profile


class Fixed(FastCollector):
    def __init__(self, families: list[Family]) -> None:
        self._families = families

    def families(self) -> list[Family]:
        return self._families


def test_families_render_byte_for_byte_like_prometheus_client() -> None:
    c = Family("x_energy_joules", 'Doc with \\ and\nnewline "quoted".', "counter", ["zeta", "alpha"])
    c.add(['we"ird\\va\nlue', "a"], 1e21)
    c.add(["plain", "b"], 0.1 + 0.2)
    g = Family("x_power_watts", "Power.", "gauge", ["replica"])
    g.add(["r0"], float("nan"))
    g.add(["r1"], float("inf"))
    g.add(["r2"], 12345678.0)
    registry = ExporterRegistry()
    registry.register(Fixed([c, g]))
    assert registry.render() == generate_latest(registry)


def test_histograms_match_prometheus_client_apart_from_created() -> None:
    ours = HistogramCollector("x_seconds", "Latency.", "replica", LATENCY_BUCKETS_S)
    ref_registry = CollectorRegistry()
    ref = Histogram("x_seconds", "Latency.", ["replica"], registry=ref_registry, buckets=LATENCY_BUCKETS_S)
    for i, v in enumerate([0.0005, 0.001, 0.02, 0.3, 5.0, 100.0, 0.001] * 3):
        ours.observe(f"r{i % 2}", v)
        ref.labels(replica=f"r{i % 2}").observe(v)
    expected = "".join(
        line + "\n" for line in generate_latest(ref_registry).decode().splitlines() if "_created" not in line
    )
    assert ours.render_text() == expected


def test_deployment_registry_renders_like_generate_latest() -> None:
    snap = ExportSnapshot(
        [DeviceSample(f"replica-{r}", f"gpu{d}", "nvml", "measured", 1e5 * r + d, 350.5, 1980.0, r)
         for r in range(3) for d in range(2)],
        [ReplicaSample(f"replica-{r}", "nvml", 100, 50, 40.0, 50.0, 10.0, 3, 1) for r in range(3)],
    )
    registry, latency = build_registry(lambda: snap, load_site_profile("aws"))
    latency.observe("replica-0", 0.2, None, 2.0)
    assert registry.render() == generate_latest(registry)
    assert b"llm_energy_request_e2e_seconds_count{replica=\"replica-0\"} 1.0" in registry.render()
