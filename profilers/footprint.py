"""Water and carbon from IT energy and a site profile (Jegham et al. 2025, "How hungry is AI?").

    facility energy  E_f   = E_IT x PUE
    carbon           C     = E_f x CIF                        (CIF in kgCO2e/kWh)
    water            W     = E_IT x WUE_site + E_f x WUE_source  (litres; WUE in L/kWh)
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from profilers.errors import ConfigError

J_PER_KWH = 3.6e6
SECONDS_PER_YEAR = 365.25 * 86400


class EmbodiedCarbon(BaseModel):
    """Embodied carbon of one device (or host) and the life it is spread over."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kg_per_device: float = Field(ge=0.0, le=100_000.0, description="Cradle-to-gate kgCO2e of one device.")
    service_life_years: float = Field(gt=0.0, le=30.0, description="Years the cost is amortised over.")
    source: str = Field(default="", description="Where the figure comes from.")

    @property
    def g_per_second(self) -> float:
        """Embodied carbon charged per second of service, in gCO2e (amortised evenly over the service life)."""
        return self.kg_per_device * 1000.0 / (self.service_life_years * SECONDS_PER_YEAR)

    def grams(self, seconds_in_use: float) -> float:
        """Embodied carbon (gCO2e) of ``seconds_in_use`` seconds of the device's service life."""
        return max(0.0, seconds_in_use) * self.g_per_second


class HostPower(BaseModel):
    """CPU and DRAM power of one host node, idle and busy (its accelerators excluded), with where it comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_idle_w: float = Field(ge=0.0, le=10_000.0)
    cpu_busy_w: float = Field(ge=0.0, le=10_000.0)
    dram_idle_w: float = Field(ge=0.0, le=10_000.0)
    dram_busy_w: float = Field(ge=0.0, le=10_000.0)
    source: str = Field(min_length=1, description="Where the figures come from (required).")

    @model_validator(mode="after")
    def _busy_not_below_idle(self) -> HostPower:
        if self.cpu_busy_w < self.cpu_idle_w or self.dram_busy_w < self.dram_idle_w:
            raise ValueError("busy power below idle power (cpu_busy_w >= cpu_idle_w, dram_busy_w >= dram_idle_w)")
        return self

    def power_w(self, utilization: float) -> tuple[float, float]:
        """(CPU, DRAM) watts at ``utilization`` in [0, 1]: idle + (busy - idle) x utilization."""
        u = min(1.0, max(0.0, utilization))
        return (self.cpu_idle_w + (self.cpu_busy_w - self.cpu_idle_w) * u,
                self.dram_idle_w + (self.dram_busy_w - self.dram_idle_w) * u)


class SiteProfile(BaseModel):
    """Efficiency and grid figures of a data-centre site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pue: float = Field(ge=1.0, le=3.0, description="Power usage effectiveness (facility / IT energy).")
    wue_site_l_per_kwh: float = Field(ge=0.0, le=20.0, description="On-site cooling water per IT kWh.")
    wue_source_l_per_kwh: float = Field(
        ge=0.0, le=50.0, description="Water consumed generating one kWh of the grid's electricity."
    )
    cif_kg_per_kwh: float = Field(ge=0.0, le=2.0, description="Carbon intensity of the grid, kgCO2e/kWh.")
    source: str = Field(default="", description="Where the figures come from.")
    cif_series_csv: str | None = Field(
        default=None,
        description="CSV of `timestamp,gco2e_per_kwh` that replaces cif_kg_per_kwh for operational carbon "
        "where time is known (a relative path is taken from the profile's folder).",
    )
    market_cif_kg_per_kwh: float | None = Field(
        default=None, ge=0.0, le=2.0,
        description="Market-based factor, kgCO2e/kWh: the contractual instruments' (PPA, certificates, supplier "
        "factor; GHG Protocol Scope 2). None: not reported (the figure is missing, not zero).",
    )
    market_cif_source: str = Field(default="", description="The contract or instrument behind the market factor.")
    embodied: dict[str, EmbodiedCarbon] = Field(
        default_factory=dict,
        description="Embodied carbon overrides, keyed by device preset (h100_sxm) or host node (hgx_h100).",
    )
    host_power: dict[str, HostPower] = Field(
        default_factory=dict, description="Host CPU/DRAM power overrides, keyed by host node (hgx_h100)."
    )

    @model_validator(mode="after")
    def _market_factor_needs_source(self) -> SiteProfile:
        if self.market_cif_kg_per_kwh is not None and not self.market_cif_source.strip():
            raise ValueError(
                "market_cif_source: required with market_cif_kg_per_kwh (name the contract: PPA, certificates or "
                "supplier-specific factor)"
            )
        return self


@dataclass(frozen=True)
class Footprint:
    """Energy (IT and facility, J), water (site and source, L) and carbon (gCO2e) of some IT energy at a site."""

    energy_it_j: float
    energy_facility_j: float
    water_site_l: float
    water_source_l: float
    carbon_g: float

    @property
    def water_l(self) -> float:
        """Total water in litres: on site (cooling) plus at the source (electricity generation)."""
        return self.water_site_l + self.water_source_l


def footprint(energy_it_j: float, site: SiteProfile) -> Footprint:
    """The footprint of ``energy_it_j`` joules of IT energy at a site (PUE, WUE and CIF applied)."""
    e_it_kwh = energy_it_j / J_PER_KWH
    e_f_kwh = e_it_kwh * site.pue
    return Footprint(
        energy_it_j=energy_it_j,
        energy_facility_j=e_f_kwh * J_PER_KWH,
        water_site_l=e_it_kwh * site.wue_site_l_per_kwh,
        water_source_l=e_f_kwh * site.wue_source_l_per_kwh,
        carbon_g=e_f_kwh * site.cif_kg_per_kwh * 1000.0,
    )


def builtin_site_names() -> list[str]:
    """Names of the site profiles shipped in ``profilers/sites`` (usable as ``site:``)."""
    folder = resources.files("profilers") / "sites"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


class UnknownSiteError(ConfigError):
    """A site name that is neither a built-in profile nor an existing YAML file."""


def load_site_profile(name_or_path: str) -> SiteProfile:
    """A shipped profile by name (``azure``, ``aws``, ``deepseek``) or a YAML file of the same fields."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"site profile {path}: not a readable YAML file: {e}") from e
        series = data.get("cif_series_csv") if isinstance(data, dict) else None
        if series and not Path(series).is_absolute():
            data["cif_series_csv"] = str(path.parent / series)
    else:
        res = resources.files("profilers") / "sites" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise UnknownSiteError(
                f"unknown site profile {name_or_path!r}: use one of {builtin_site_names()} "
                "or the path of a YAML file with name, pue, wue_site_l_per_kwh, wue_source_l_per_kwh, "
                "cif_kg_per_kwh"
            )
        data = yaml.safe_load(res.read_text())
    try:
        return SiteProfile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"site profile {name_or_path}: {ranged_problems(e)}") from e


def _bounds(field_name: str) -> str:
    """The allowed range of a profile field, from its constraints (empty where it has none)."""
    for model in (SiteProfile, EmbodiedCarbon, HostPower):
        info = model.model_fields.get(field_name)
        if info is None:
            continue
        lo = hi = ""
        for m in info.metadata:
            lo = f">= {m.ge:g}" if getattr(m, "ge", None) is not None else f"> {m.gt:g}" if getattr(
                m, "gt", None) is not None else lo
            hi = f"<= {m.le:g}" if getattr(m, "le", None) is not None else f"< {m.lt:g}" if getattr(
                m, "lt", None) is not None else hi
        return " and ".join(x for x in (lo, hi) if x)
    return ""


def ranged_problems(err: ValidationError) -> str:
    """Each problem as ``field: message (got value; allowed: range)``, joined by ``; ``."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        field = next((str(p) for p in reversed(e["loc"]) if isinstance(p, str)), "")
        got = "" if isinstance(e.get("input"), dict | list) or "input" not in e or e["type"] == "missing" else (
            f"got {e['input']!r}")
        allowed = _bounds(field)
        extra = "; ".join(x for x in (got, f"allowed: {allowed}" if allowed else "") if x)
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" + (f" ({extra})" if extra else ""))
    return "; ".join(out)
