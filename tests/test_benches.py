"""The benches' own logic, and a short run of the process-crossing bench, so that the scripts the issue notes
quote keep working."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_closed_loop_blocks_cover_every_request_in_whole_waves() -> None:
    blocks = _load("vllm_overhead").blocks
    assert blocks(96, 1, 4) == [24, 24, 24, 24]
    assert blocks(96, 8, 4) == [32, 32, 32]  # at least four waves of 8 per block
    assert blocks(97, 1, 4) == [25, 24, 24, 24]
    assert blocks(64, 16, 4) == [64] and blocks(10, 4, 4) == [10]  # too few for two blocks: one


def test_mixed_schedule_is_one_poisson_stream_shared_by_the_paths() -> None:
    schedule = _load("vllm_overhead").mixed_schedule(["direct", "http"], 200, 10.0, seed=1)
    assert [len(v) for v in schedule.values()] == [200, 200]
    dues = sorted(d for v in schedule.values() for d in v)
    assert len(set(dues)) == 400 and 30 < dues[-1] < 50  # 400 arrivals at 10/s: ~40 s
    assert schedule == _load("vllm_overhead").mixed_schedule(["direct", "http"], 200, 10.0, seed=1)


@pytest.mark.slow
def test_hop_floor_bench_prints_a_row_per_server_end() -> None:
    run = subprocess.run([sys.executable, str(BENCH / "hop_floor.py"), "--frames", "30", "--gaps-ms", "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ends = {"uvloop", "protocol", "ray actor", "blocking"}
    rows = {end: line[len(end):].split() for line in run.stdout.splitlines() for end in ends if line.startswith(end)}
    assert rows.keys() == ends
    for gap, rtt_p50, rtt_p90, crossing in (map(float, cells) for cells in rows.values()):
        assert gap == 0 and 0 < rtt_p50 <= rtt_p90 and crossing == pytest.approx(rtt_p50 / 2, abs=1)
