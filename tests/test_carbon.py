"""CIF time series, embodied carbon, and how the exporter reports them."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from profilers.carbon import (
    CarbonAccumulator,
    CifSeries,
    CifSeriesError,
    EmbodiedCarbon,
    operational_carbon_g,
    site_cif_series,
)
from profilers.exporter import DeviceSample, EnergyCollector, ExportSnapshot, ReplicaSample, build_registry
from profilers.footprint import J_PER_KWH, footprint, load_site_profile

SITE = load_site_profile("azure")


@pytest.fixture
def cif_csv(tmp_path: Path) -> Path:
    p = tmp_path / "cif.csv"
    p.write_text("timestamp,gco2e_per_kwh\n2026-01-01T00:00:00Z,100\n2026-01-01T01:00:00Z,300\n")
    return p


def test_series_is_a_step_function_with_time_weighted_mean(cif_csv: Path) -> None:
    s = CifSeries.load_csv(cif_csv)
    t0 = s.t_s[0]
    assert s.at(t0 - 10) == 100 and s.at(t0 + 10) == 100 and s.at(t0 + 3600) == 300
    assert s.mean(t0 + 1800, t0 + 5400) == pytest.approx(200.0)  # half an hour at each value


def test_operational_carbon_with_a_constant_matches_footprint() -> None:
    e = 5 * J_PER_KWH
    assert operational_carbon_g(e, SITE, 0, 10) == pytest.approx(footprint(e, SITE).carbon_g)


def test_operational_carbon_follows_the_series(cif_csv: Path) -> None:
    s = CifSeries.load_csv(cif_csv)
    t0 = s.t_s[0]
    g = operational_carbon_g(J_PER_KWH, SITE, t0 + 1800, t0 + 5400, s)
    assert g == pytest.approx(SITE.pue * 200.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [("1,abc\n", "is not a number"), ("1\n", "expected `timestamp,gco2e_per_kwh`"),
     ("0,1\nyesterday,100\n", "neither Unix seconds nor ISO 8601"), ("1,5000\n", "outside 0-2000"),
     ("timestamp,g\n", "has no rows")],
)
def test_bad_series_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(CifSeriesError, match=message):
        CifSeries.load_csv(p)


def test_missing_series_file(tmp_path: Path) -> None:
    with pytest.raises(CifSeriesError, match="does not exist"):
        CifSeries.load_csv(tmp_path / "nope.csv")


def test_accumulator_charges_increments_at_their_cif_and_survives_resets(cif_csv: Path) -> None:
    s = CifSeries.load_csv(cif_csv)
    t0 = s.t_s[0]
    acc = CarbonAccumulator(SITE, s)
    assert acc.update("d", 0.0, t0) == 0.0
    g1 = acc.update("d", J_PER_KWH, t0 + 600)  # spent at 100 g/kWh
    assert g1 == pytest.approx(SITE.pue * 100.0)
    assert acc.update("d", 0.0, t0 + 3700) == pytest.approx(g1)  # reset: nothing negative
    assert acc.update("d", J_PER_KWH, t0 + 3800) == pytest.approx(g1 + SITE.pue * 300.0)


def test_embodied_is_amortised_per_second() -> None:
    e = EmbodiedCarbon(kg_per_device=150.0, service_life_years=5.0)
    year = 365.25 * 86400
    assert e.grams(5 * year) == pytest.approx(150_000.0)
    assert e.grams(-1) == 0.0


def scrape(registry) -> dict[tuple[str, str], float]:  # type: ignore[no-untyped-def]
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, s.labels.get("scope", ""))] = s.value
    return out


def test_exporter_reports_embodied_beside_operational_and_the_closure_error() -> None:
    clock = iter([0.0, 0.0, 3600.0, 3600.0])
    snap = ExportSnapshot(
        [DeviceSample("r0", "emu0", "emulated", "modeled", 1000.0, 300.0, None, 3)],
        [ReplicaSample("r0", "emulated", 1, 1, 400.0, 500.0, 90.0, 0, 0)],
    )
    embodied = EmbodiedCarbon(kg_per_device=175.32, service_life_years=5.0)
    registry = CollectorRegistry()
    registry.register(EnergyCollector(lambda: snap, SITE, clock=lambda: next(clock), embodied=embodied))
    scrape(registry)
    values = scrape(registry)
    assert values[("llm_energy_carbon_grams_total", "embodied")] == pytest.approx(embodied.grams(3600.0))
    operational = values[("llm_energy_carbon_grams_total", "operational")]
    assert operational == pytest.approx(footprint(1000, SITE).carbon_g)
    assert values[("llm_energy_attribution_error_ratio", "")] == pytest.approx(10.0 / 1000.0)
    assert values[("llm_energy_sampler_errors_total", "")] == 3


def test_a_site_profile_can_name_a_cif_series_next_to_it(tmp_path: Path, cif_csv: Path) -> None:
    (tmp_path / "site.yaml").write_text(
        "name: hourly\npue: 1.2\nwue_site_l_per_kwh: 0.3\nwue_source_l_per_kwh: 3\ncif_kg_per_kwh: 0.4\n"
        f"cif_series_csv: {cif_csv.name}\n"
    )
    site = load_site_profile(str(tmp_path / "site.yaml"))
    series = CifSeries.load_csv(cif_csv)
    t0 = series.t_s[0]
    snaps = iter([
        ExportSnapshot([DeviceSample("r0", "emu0", "emulated", "modeled", 0.0, 0.0, None)], []),
        ExportSnapshot([DeviceSample("r0", "emu0", "emulated", "modeled", J_PER_KWH, 0.0, None)], []),
    ])
    walls = iter([t0 + 3700, t0 + 7000])  # the kWh is spent while the series says 300 g/kWh
    collector = EnergyCollector(lambda: next(snaps), site, cif=site_cif_series(site),
                                wall_clock=lambda: next(walls))
    registry = CollectorRegistry()
    registry.register(collector)
    scrape(registry)
    assert scrape(registry)[("llm_energy_carbon_grams_total", "operational")] == pytest.approx(1.2 * 300.0)


def test_a_missing_series_named_by_a_site_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(
        "name: x\npue: 1.2\nwue_site_l_per_kwh: 0.3\nwue_source_l_per_kwh: 3\ncif_kg_per_kwh: 0.4\n"
        "cif_series_csv: nowhere.csv\n"
    )
    with pytest.raises(CifSeriesError, match=r"nowhere\.csv does not exist"):
        build_registry(ExportSnapshot, load_site_profile(str(tmp_path / "site.yaml")))
