import pytest

from profilers.footprint import J_PER_KWH, SiteProfile, UnknownSiteError, footprint, load_site_profile


@pytest.mark.parametrize(
    ("name", "pue", "wue_site", "wue_source", "cif"),
    [("azure", 1.12, 0.30, 3.142, 0.3528), ("aws", 1.14, 0.18, 3.142, 0.385), ("deepseek", 1.27, 1.20, 6.016, 0.6)],
)
def test_shipped_profiles(name: str, pue: float, wue_site: float, wue_source: float, cif: float) -> None:
    site = load_site_profile(name)
    assert (site.pue, site.wue_site_l_per_kwh, site.wue_source_l_per_kwh, site.cif_kg_per_kwh) == (
        pue, wue_site, wue_source, cif,
    )


def test_formulas_follow_jegham_et_al() -> None:
    site = SiteProfile(name="t", pue=1.5, wue_site_l_per_kwh=0.5, wue_source_l_per_kwh=2.0, cif_kg_per_kwh=0.4)
    fp = footprint(2 * J_PER_KWH, site)  # 2 kWh of IT energy
    assert fp.energy_facility_j == pytest.approx(3 * J_PER_KWH)
    assert fp.water_site_l == pytest.approx(2 * 0.5)
    assert fp.water_source_l == pytest.approx(3 * 2.0)  # source water is charged on facility energy
    assert fp.water_l == pytest.approx(7.0)
    assert fp.carbon_g == pytest.approx(3 * 0.4 * 1000)


def test_custom_profile_from_yaml(tmp_path) -> None:
    path = tmp_path / "mysite.yaml"
    path.write_text("name: mine\npue: 1.3\nwue_site_l_per_kwh: 1\nwue_source_l_per_kwh: 2\ncif_kg_per_kwh: 0.1\n")
    assert load_site_profile(str(path)).name == "mine"


def test_unknown_profile_names_the_choices() -> None:
    with pytest.raises(UnknownSiteError, match=r"unknown site profile 'mars'.*azure"):
        load_site_profile("mars")


def test_profile_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="pue"):
        SiteProfile(name="bad", pue=0.8, wue_site_l_per_kwh=0, wue_source_l_per_kwh=0, cif_kg_per_kwh=0)
