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


@pytest.mark.slow
def test_vllm_overhead_bench_measures_every_path_on_a_real_engine(tmp_path: Path) -> None:
    """A short run of the bench behind #3's figures: every path at every load gets a row, and the replica's start
    time and memory are reported."""
    pytest.importorskip("vllm", reason="vllm is not installed: scripts/install-vllm.sh")
    run = subprocess.run(
        [sys.executable, str(BENCH / "vllm_overhead.py"), "--requests", "8", "--concurrency", "1", "--rates", "10",
         "--rounds", "1", "--blocks", "1", "--paths", "direct", "router", "http", "in-replica", "--trace"],
        capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    for path in ("direct", "router", "http", "in-replica"):
        for load in ("c=1", "10/s"):
            assert sum(1 for r in rows if r[:2] == [path, load]) == 2, (path, load)  # its table and the trace's
    closed = {r[0]: float(r[3]) for r in rows if len(r) == 10 and r[1] == "c=1"}
    assert closed["direct"] == 1.0 and all(ratio > 0 for ratio in closed.values())
    start = run.stdout.split("engine start s", 1)[1].splitlines()[1].split()
    assert 0 < float(start[0]) < 300 and float(start[1]) > 100  # seconds; MiB of the replica's processes


def test_prefix_cache_table_gives_medians_and_the_change_against_the_cache_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import pandas as pd

    bench = _load("prefix_cache")

    def points(j: float, ttft: float) -> pd.DataFrame:
        return pd.DataFrame({"offered_rps": [2.0], "energy_per_token_j": [j], "ttft_p50_s": [ttft],
                             "ttft_p99_s": [2 * ttft], "mean_power_w": [20.0]})

    results = {(256, True): [points(0.9, 0.010), points(0.8, 0.012), points(0.7, 0.011)],
               (256, False): [points(1.0, 0.020), points(1.0, 0.022), points(1.0, 0.030)]}
    bench.print_table(results, 3)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("│")]
    assert rows == [
        ["256", "2", "on", "0.8", "0.011", "0.022", "20", "-20.0%", "-50.0%"],  # medians, then on / off - 1
        ["256", "2", "off", "1", "0.022", "0.044", "20", "", ""],
    ]


def test_calibration_bench_prints_a_row_per_measurement_and_the_band_per_gpu() -> None:
    run = subprocess.run([sys.executable, str(BENCH / "calibration.py"), "--gpu", "H100", "--mode", "mean-field"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert sum(" H100x" in line for line in lines) == 50
    assert any(line.startswith("H100 | 50 |") for line in lines)


def test_door_bench_prints_admitted_and_rejected_streams_and_health_under_a_flood() -> None:
    run = subprocess.run([sys.executable, str(BENCH / "door_bench.py"), "--streams", "10", "40", "--max-inflight",
                          "20", "--max-connections", "60", "--max-tokens", "200", "--attack-rounds", "2",
                          "--attack-mb", "16"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = {cells[0]: cells[1:4] for line in run.stdout.splitlines() if (cells := line.split())[:1] in (["10"], ["40"])}
    assert rows["10"] == ["10", "0", "0"]  # all admitted
    admitted, rejected, failed = map(int, rows["40"])
    assert admitted + rejected == 40 and rejected >= 10 and failed == 0  # beyond the in-flight cap: 503s, no failure
    assert "/health during the flood" in run.stdout and ", 0 failed," in run.stdout
    (attack,) = [line for line in run.stdout.splitlines() if line.startswith("oversized bodies")]
    # Every oversized body is refused with a 413 that its sender reads, even one still writing (a lingering close).
    answers = eval(attack.split("answers ")[1].split("; door RSS")[0])  # the bench's dict of status lines
    assert answers == {"HTTP/1.1 413 Request Entity Too Large": 8}, attack
    (counted,) = [line for line in run.stdout.splitlines() if line.startswith("door refusals")]
    assert f"in_flight {rejected}" in counted and "body_too_large" in counted, counted  # each 503 counted


def test_every_bench_imports_and_parses_its_arguments() -> None:
    """Each script under bench/ the notes quote still imports and answers --help: one process runs them all as
    __main__, so a renamed import or a deleted helper fails here, not in the next session's measurement."""
    script = (
        "import runpy, sys\n"
        "failed = []\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "        failed.append(f'{path}: no usage (ran without exiting)')\n"
        "    except SystemExit as done:\n"
        "        if done.code not in (0, None):\n"
        "            failed.append(f'{path}: exit {done.code}')\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{path}: {type(exc).__name__}: {exc}')\n"
        "print('FAILED', failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    benches = sorted(str(p) for p in BENCH.glob("*.py"))
    done = subprocess.run([sys.executable, "-c", script, *benches], capture_output=True, text=True, timeout=300,
                          cwd=BENCH.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("usage:") == len(benches)
