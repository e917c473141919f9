"""Footprint as the standards count it: two energy boundaries, embodied carbon, both carbon methods, and SCI.

* **accelerator** boundary: the accelerators' own energy (what ML.ENERGY and most papers report; points.csv's
  ``energy_j`` and ``energy_per_token_j``).
* **comprehensive** boundary: accelerators + the host's CPU and DRAM for the share of the node the replicas
  occupy (its idle power for the whole window, since provisioned capacity draws it whether used or not, plus its
  dynamic power at the accelerators' busy share), times the site's PUE. A host part is ``measured`` (RAPL),
  ``modeled`` (a host power preset, ``profilers/hardware/catalog.yaml`` or the site profile) or ``missing``: a
  missing part leaves the comprehensive figure NaN, never a smaller number.
* **embodied** carbon: each device's and the host share's manufacture, amortised linearly over its service life
  and charged for the seconds of use (time x share of the node).
* **location-based** carbon: the grid's intensity (the site's CIF); **market-based**: the site's contractual
  factor, with its source, NaN where the site declares none.
* **SCI** (Green Software Foundation, ISO/IEC 21031:2024): ``SCI = ((E x I) + M) per R``, E in kWh, I the
  location-based intensity in gCO2e/kWh, M the embodied grams, R the functional unit (an output token, a
  request). An SCI that lacks a part (no embodied figure for a device, host energy missing) is marked
  ``partial`` with the parts it lacks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from profilers.errors import ConfigError
from profilers.footprint import J_PER_KWH, EmbodiedCarbon, HostPower, SiteProfile, ranged_problems

BOUNDARIES = ("accelerator", "comprehensive")


class NodeProfile(BaseModel):
    """A host node: how many accelerators it holds, its embodied carbon (accelerators excluded), its power."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices_per_node: int = Field(ge=1, le=256)
    description: str = ""
    embodied: EmbodiedCarbon | None = None
    host_power: HostPower | None = None


class DeviceProfile(BaseModel):
    """An accelerator preset's embodied carbon and the node it sits in; ``missing`` says why a figure is absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str | None = None
    embodied: EmbodiedCarbon | None = None
    missing: str = ""


class HardwareCatalog(BaseModel):
    """The shipped hardware figures: embodied carbon of devices and the host nodes they sit in, with sources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    boavizta: str = ""
    devices: dict[str, DeviceProfile] = Field(default_factory=dict)
    nodes: dict[str, NodeProfile] = Field(default_factory=dict)

    def device_embodied(self, preset: str, site: SiteProfile | None = None) -> EmbodiedCarbon | None:
        """A device's embodied carbon: the site profile's override, else the catalog's (None: no sourced figure)."""
        if site is not None and preset in site.embodied:
            return site.embodied[preset]
        dev = self.devices.get(preset)
        return dev.embodied if dev is not None else None

    def node_of(self, preset: str) -> tuple[str, NodeProfile] | None:
        """The host node (name, profile) a device preset sits in, or None where the catalog has none."""
        dev = self.devices.get(preset)
        if dev is None or dev.node is None or dev.node not in self.nodes:
            return None
        return dev.node, self.nodes[dev.node]


@lru_cache(maxsize=1)
def load_catalog() -> HardwareCatalog:
    """The shipped hardware catalog (``profilers/hardware/catalog.yaml``)."""
    res = resources.files("profilers") / "hardware" / "catalog.yaml"
    try:
        return HardwareCatalog.model_validate(yaml.safe_load(res.read_text()))
    except ValidationError as e:  # a shipped file: a bug, but say where
        raise ConfigError(f"profilers/hardware/catalog.yaml: {ranged_problems(e)}") from e


def sci(energy_kwh: float, intensity_g_per_kwh: float, embodied_g: float, functional_units: float) -> float:
    """The GSF Software Carbon Intensity: ``((E x I) + M) per R`` (NaN when R is not positive)."""
    if not functional_units > 0:
        return math.nan
    return (energy_kwh * intensity_g_per_kwh + embodied_g) / functional_units


@dataclass(frozen=True)
class Lifecycle:
    """A window's footprint in both boundaries, embodied carbon, both carbon methods and the SCI's inputs."""

    accelerator_j: float
    host_cpu_j: float
    host_dram_j: float
    comprehensive_j: float
    """(accelerator + host CPU + host DRAM) x PUE; NaN where a host part is missing."""
    embodied_g: float
    """Embodied grams charged to the window for the parts that have a figure."""
    carbon_location_g: float
    """Operational carbon of the SCI's energy at the grid's (location-based) intensity."""
    carbon_market_g: float
    """The same energy at the site's market-based factor (NaN: the site declares none)."""
    sci_energy_kwh: float
    intensity_g_per_kwh: float
    parts: list[str] = field(default_factory=list)
    """Each part and its provenance: ``host cpu: modeled (hgx_h100)``, ``embodied h100_sxm: Boavizta ...``."""
    missing: list[str] = field(default_factory=list)
    """Parts with no figure (empty: the SCI is complete)."""

    @property
    def sci_status(self) -> str:
        """``complete``, or ``partial: ...`` naming the parts that have no figure."""
        return "complete" if not self.missing else "partial: " + "; ".join(self.missing)

    def sci_per(self, functional_units: float) -> float:
        """The SCI, ((E x I) + M) per functional unit, in gCO2e."""
        return sci(self.sci_energy_kwh, self.intensity_g_per_kwh, self.embodied_g, functional_units)


def window_lifecycle(
    accelerator_j: float,
    duration_s: float,
    presets: Sequence[str | None],
    site: SiteProfile,
    *,
    busy_share: float = 1.0,
    accelerator_provenance: str = "measured",
    intensity_g_per_kwh: float | None = None,
    catalog: HardwareCatalog | None = None,
) -> Lifecycle:
    """The footprint of ``duration_s`` of use of the devices ``presets`` (one entry per metered device; None for
    a real device, whose hardware the catalog does not know) that spent ``accelerator_j``.

    ``busy_share``: the accelerators' busy share in [0, 1], at which the host's dynamic power is charged.
    ``intensity_g_per_kwh``: the location-based intensity (default: the site's constant CIF).
    """
    catalog = catalog or load_catalog()
    pue = site.pue
    intensity = intensity_g_per_kwh if intensity_g_per_kwh is not None else site.cif_kg_per_kwh * 1000.0
    parts = [f"accelerator: {accelerator_provenance}", f"PUE {pue:g}: site {site.name}"]
    missing: list[str] = []
    duration = max(0.0, duration_s) if math.isfinite(duration_s) else 0.0
    embodied_g = 0.0
    host_cpu_j = host_dram_j = 0.0
    host_known = bool(presets)
    node_share: dict[str, float] = {}
    nodes: dict[str, NodeProfile] = {}
    for preset in presets:
        name = preset or "real device"
        emb = catalog.device_embodied(preset, site) if preset else None
        if emb is None:
            why = catalog.devices[preset].missing if preset in catalog.devices else "not in the hardware catalog"
            missing.append(f"embodied {name}: {why}" if preset else "embodied of a real device: give it in the site "
                           "profile's embodied")
        else:
            embodied_g += emb.grams(duration)
        node = catalog.node_of(preset) if preset else None
        if node is None:
            host_known = False
            continue
        node_name, prof = node
        nodes[node_name] = prof
        node_share[node_name] = node_share.get(node_name, 0.0) + 1.0 / prof.devices_per_node
    for tag in dict.fromkeys(f"embodied {p}: {catalog.device_embodied(p, site).source}"  # type: ignore[union-attr]
                             for p in presets if p and catalog.device_embodied(p, site) is not None):
        parts.append(tag)
    for node_name, share in node_share.items():
        prof = nodes[node_name]
        power = site.host_power.get(node_name, prof.host_power)
        emb = site.embodied.get(node_name, prof.embodied)
        if power is None:
            host_known = False
        else:
            cpu_w, dram_w = power.power_w(busy_share)
            host_cpu_j += share * cpu_w * duration
            host_dram_j += share * dram_w * duration
            parts.append(f"host {node_name} CPU+DRAM (share {share:.3g}): modeled, {power.source}")
        if emb is None:
            missing.append(f"embodied host {node_name}: no figure")
        else:
            embodied_g += emb.grams(duration * share)
            parts.append(f"embodied host {node_name} (share {share:.3g}): {emb.source}")
    if not host_known:
        host_cpu_j = host_dram_j = math.nan
        unknown = sorted({p or "real device" for p in presets if not (p and catalog.node_of(p))}) or ["no device"]
        missing.append(f"host CPU/DRAM energy of {', '.join(unknown)}: missing (no host power preset)")
        parts.append("host CPU+DRAM: missing")
    comprehensive = (accelerator_j + host_cpu_j + host_dram_j) * pue
    # SCI's E: the comprehensive energy where known; else the accelerators' x PUE, and the SCI says partial.
    sci_j = comprehensive if math.isfinite(comprehensive) else accelerator_j * pue
    sci_kwh = sci_j / J_PER_KWH
    market = site.market_cif_kg_per_kwh
    return Lifecycle(
        accelerator_j=accelerator_j,
        host_cpu_j=host_cpu_j,
        host_dram_j=host_dram_j,
        comprehensive_j=comprehensive,
        embodied_g=embodied_g,
        carbon_location_g=sci_kwh * intensity,
        carbon_market_g=sci_kwh * market * 1000.0 if market is not None else math.nan,
        sci_energy_kwh=sci_kwh,
        intensity_g_per_kwh=intensity,
        parts=parts,
        missing=missing,
    )


class LifecycleAccumulator:
    """Cumulative comprehensive energy and embodied carbon of a replica from its counters, scrape by scrape: each
    interval's host energy is charged at that interval's busy share, so the totals only grow (counters)."""

    def __init__(self, site: SiteProfile, catalog: HardwareCatalog | None = None) -> None:
        self._site, self._catalog = site, catalog or load_catalog()
        self._last: dict[str, tuple[float, float, float]] = {}
        self._host_j: dict[str, float] = {}
        self._embodied_g: dict[str, float] = {}

    def update(
        self, key: str, t_s: float, accelerator_j: float, attributed_j: float, presets: Sequence[str | None],
        provenance: str = "measured",
    ) -> Lifecycle:
        """Add the interval since the last call for ``key`` and return its running totals (counters only grow)."""
        last = self._last.get(key)
        if last is not None and t_s >= last[0] and accelerator_j >= last[1]:
            d_e, d_a = accelerator_j - last[1], max(0.0, attributed_j - last[2])
            step = window_lifecycle(d_e, t_s - last[0], presets, self._site, catalog=self._catalog,
                                    busy_share=min(1.0, d_a / d_e) if d_e > 0 else 0.0,
                                    accelerator_provenance=provenance)
            self._host_j[key] = self._host_j.get(key, 0.0) + step.host_cpu_j + step.host_dram_j
            self._embodied_g[key] = self._embodied_g.get(key, 0.0) + step.embodied_g
        self._last[key] = (t_s, accelerator_j, attributed_j)
        base = window_lifecycle(accelerator_j, 0.0, presets, self._site, catalog=self._catalog,
                                accelerator_provenance=provenance)
        host = self._host_j.get(key, 0.0) if math.isfinite(base.host_cpu_j) else math.nan
        comprehensive = (accelerator_j + host) * self._site.pue
        sci_j = comprehensive if math.isfinite(comprehensive) else accelerator_j * self._site.pue
        market = self._site.market_cif_kg_per_kwh
        return Lifecycle(
            accelerator_j=accelerator_j, host_cpu_j=host, host_dram_j=0.0 if math.isfinite(host) else math.nan,
            comprehensive_j=comprehensive, embodied_g=self._embodied_g.get(key, 0.0),
            carbon_location_g=sci_j / J_PER_KWH * base.intensity_g_per_kwh,
            carbon_market_g=sci_j / J_PER_KWH * market * 1000.0 if market is not None else math.nan,
            sci_energy_kwh=sci_j / J_PER_KWH, intensity_g_per_kwh=base.intensity_g_per_kwh,
            parts=base.parts, missing=base.missing,
        )
