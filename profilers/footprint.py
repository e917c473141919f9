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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from profilers.errors import ConfigError, validation_problems

J_PER_KWH = 3.6e6


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
        raise ConfigError(f"site profile {name_or_path}: {validation_problems(e)}") from e
