import logging

import pytest

from profilers.meter import CounterSample, window_energy


def s(e: float) -> CounterSample:
    return CounterSample(e, "measured")


def test_window_is_counter_difference() -> None:
    m = window_energy({"a": s(10.0), "b": s(5.0)}, {"a": s(25.0), "b": s(7.5)}, 2.0)
    assert m.energy_j == {"a": 15.0, "b": 2.5}
    assert m.total_j == 17.5
    assert m.provenance_label == "measured"


def test_counter_reset_is_dropped_not_negative(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        m = window_energy({"a": s(100.0), "b": s(1.0)}, {"a": s(3.0), "b": s(2.0)}, 1.0)
    assert "a" not in m.energy_j and m.dropped_devices == ["a"]
    assert m.total_j == 1.0
    assert "counter reset" in caplog.text


def test_vanished_device_is_reported() -> None:
    m = window_energy({"a": s(1.0)}, {}, 1.0)
    assert m.dropped_devices == ["a"] and m.total_j == 0.0
    assert m.provenance_label == "unavailable"


def test_mixed_provenance() -> None:
    m = window_energy({"a": s(0), "b": s(0)}, {"a": s(1), "b": CounterSample(1, "modeled")}, 1.0)
    assert m.provenance_label == "mixed"
