"""Fleet-scale virtual time: fast-forwarded decode runs equal stepping one by one; sweeps as Ray tasks equal a
serial run, survive a killed worker, and refuse an unreachable cluster before writing anything."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml

from deploy.cli import main
from deploy.config import CampaignFile, PathLatency
from deploy.virtual import FAULT_ENV, VirtualTarget, run_virtual_campaign
from serving.config import EmulatedEngineConfig, ServingConfig
from serving.knobs import Knobs
from workloads.arrivals import RequestSpec

ROOT = Path(__file__).resolve().parents[1]


def _simulate(seed: int, fast_forward: bool) -> tuple[list[tuple], list[tuple]]:
    """Random requests on 3 replicas, with knob changes (clock, speculation, batch cap) at random instants."""
    rng = random.Random(seed)
    engine = EmulatedEngineConfig(max_model_len=4096, max_num_seqs=rng.choice([4, 16, 64]))
    config = ServingConfig(replicas=3, engine=engine)
    target = VirtualTarget(config, latency=PathLatency())
    for e in target.engines:
        e.fast_forward = fast_forward
    work = sorted((RequestSpec(rng.uniform(0, 20), rng.randint(1, 1500), rng.randint(1, 400)) for _ in range(120)),
                  key=lambda s: s.t_s)
    knobs = [(rng.uniform(0, 25), Knobs(clock_mhz=rng.choice([1980, 1410, 900]))) for _ in range(4)]
    spec_on = rng.uniform(0, 15)  # speculation (random acceptance: stepped one by one) for 3 s
    knobs += [(spec_on, Knobs(speculative_tokens=3)), (spec_on + 3, Knobs(speculative_tokens=0))]
    knobs.sort(key=lambda k: k[0])
    reads: list[tuple] = []
    ff: list[float] = []

    async def meddle() -> None:
        for t, k in knobs:
            await target.clock.sleep_until(t)
            for e in target.engines:
                await e.apply(k)
            for e in target.engines:  # what a controller or a sampler sees, mid-run
                st, rd = e.stats(), e.read()[0]
                reads.append((st.generated_tokens_total, st.kv_used_tokens, st.iterations, st.attributed_decode_j,
                              rd.energy_j, rd.power_w))

    async def go() -> list:
        await target.start()
        m = asyncio.ensure_future(meddle())
        records = await target.send(0, work, 0, lambda r: None, lambda t: None)
        await m
        for e in target.engines:
            st = e.stats()
            reads.append((st.generated_tokens_total, st.iterations, st.attributed_decode_j, e.read()[0].energy_j))
        steps = sum(e.stats().iterations for e in target.engines)
        ff.append(sum(e.fast_forwarded_steps for e in target.engines) / steps)
        await target.stop()
        return records

    records = target.clock.execute(go())
    assert (ff[0] > 0.5) if fast_forward else ff[0] == 0  # many steps fast-forwarded, or none
    return [(r.replica, r.output_tokens, r.energy_j, r.ttft_s, r.e2e_s, tuple(r.itl_s)) for r in records], reads


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_fast_forward_equals_stepping_one_by_one(seed: int) -> None:
    """Token times, per-request energy and every counter read mid-run: equal as floats (tolerance 0; the issue
    allows 1e-9 relative for energy, the fast path needs none)."""
    fast, fast_reads = _simulate(seed, True)
    slow, slow_reads = _simulate(seed, False)
    assert fast == slow
    assert fast_reads == slow_reads
    assert sum(n for _, n, *_ in fast) > 10_000


def _through_finishing(fast_forward: bool, seed: int) -> tuple[list[tuple], list[tuple], int]:
    """One replica, a batch that finishes one request after another with no arrival in between (runs that end
    with a finishing step and start again without it), looked at (stats and power, which cut nothing) at random
    instants."""
    rng = random.Random(seed)
    target = VirtualTarget(ServingConfig(replicas=1, engine=EmulatedEngineConfig(max_model_len=4096)),
                           latency=PathLatency())
    engine = target.engines[0]
    engine.fast_forward = fast_forward
    work = [RequestSpec(0.001 * i, rng.randint(1, 1200), rng.randint(1, 300)) for i in range(12)]
    reads: list[tuple] = []

    async def look() -> None:
        for t in sorted(rng.uniform(0, 12) for _ in range(300)):
            await target.clock.sleep_until(t)
            st, rd = engine.stats(), engine.read()[0]
            reads.append((st.running, st.generated_tokens_total, st.kv_used_tokens, st.iterations,
                          st.attributed_decode_j, rd.energy_j, rd.power_w))

    async def go() -> list:
        await target.start()
        looking = asyncio.ensure_future(look())
        records = await target.send(0, work, 0, lambda r: None, lambda t: None)
        await looking
        await target.stop()
        return records

    records = target.clock.execute(go())
    return ([(r.output_tokens, r.energy_j, r.ttft_s, r.e2e_s, tuple(r.itl_s)) for r in records], reads,
            engine.fast_forwarded_steps)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_forward_runs_through_finishing_requests(seed: int) -> None:
    """Requests finishing one after another (each leaves the batch with its last token) fast-forwarded equal
    stepping one by one, read mid-run at random instants: token times, energies, KV use and counters, tolerance 0."""
    fast, fast_reads, skipped = _through_finishing(True, seed)
    slow, slow_reads, none = _through_finishing(False, seed)
    assert fast == slow
    assert fast_reads == slow_reads
    iterations = fast_reads[-1][3]  # the last look comes after the last request finished
    assert none == 0 and skipped > 0.8 * iterations  # most steps fast-forwarded


def _campaign_data(**changes: object) -> dict:
    """The quickstart, 4 s points, 2 rates x 2 clocks, in virtual time."""
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["workload"]["duration_s"] = 4
    data["sweep"] = {"rate_rps": [2, 6], "knobs": [{"clock_mhz": 1980}, {"clock_mhz": 1200}]}
    data.update(clock="virtual", **changes)
    return data


def _campaign(tmp_path: Path, **changes: object) -> CampaignFile:
    return CampaignFile.model_validate(_campaign_data(**changes))


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns="sim_speed_x"), b.drop(columns="sim_speed_x"))


def test_ray_sweep_equals_serial_and_reruns_a_killed_worker(ray_local: None, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    serial = run_virtual_campaign(_campaign(tmp_path), _campaign(tmp_path).deployment, tmp_path / "serial")
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")
    spec = _campaign(tmp_path, workers=2)
    on_ray = run_virtual_campaign(spec, spec.deployment, tmp_path / "ray")
    assert marker.exists()  # point 2's first worker died
    assert on_ray["point"].tolist() == [0, 1, 2, 3]  # every point once, in order
    _same(serial, on_ray)
    req = [pd.read_parquet(tmp_path / d / "requests.parquet") for d in ("serial", "ray")]
    pd.testing.assert_frame_equal(*req)
    # Resume: finished points are never run again (a fresh marker would kill the worker of a rerun point 2).
    marker.unlink()
    again = run_virtual_campaign(spec, spec.deployment, tmp_path / "ray")
    assert not marker.exists()
    _same(on_ray, again)


def test_workers_0_follows_the_clusters_cpus_as_they_change(ray_local: None, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``workers: 0`` reads the cluster's CPUs again as each point ends (a node seen late, an autoscaler), and
    the rows are the serial run's whatever the width."""
    import deploy.virtual as virtual

    seen = iter([1, 1, 2, 2, 2, 2, 2, 2, 2, 2])
    reads: list[int] = []
    monkeypatch.setattr(virtual, "_cluster_cpus", lambda: reads.append(next(seen, 2)) or reads[-1])
    serial = run_virtual_campaign(_campaign(tmp_path), _campaign(tmp_path).deployment, tmp_path / "serial")
    spec = _campaign(tmp_path, workers=0)
    on_ray = run_virtual_campaign(spec, spec.deployment, tmp_path / "ray")
    assert len(reads) >= 4 and 2 in reads  # once per point that ended, not once per sweep
    _same(serial, on_ray)


def test_unreachable_ray_address_fails_before_writing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data.update(clock="virtual", ray_address="127.0.0.1:9")  # discard port: nothing listens
    campaign = tmp_path / "c.yaml"
    campaign.write_text(yaml.safe_dump(data))
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "out")]) == 2
    assert "cannot reach a Ray cluster" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_where_points_run_is_not_part_of_the_configuration(tmp_path: Path) -> None:
    """A campaign resumes with other workers or on another cluster; a compare entry may size the fleet."""
    from deploy.compare import variant_spec
    from deploy.config import EngineVariant

    serial = _campaign(tmp_path)
    assert serial.config_hash() == _campaign(tmp_path, workers=0, ray_address="10.0.0.1:6379").config_hash()
    big = variant_spec(serial, EngineVariant(device="h100_sxm", replicas=256))
    assert big.deployment.replicas == 256 and serial.deployment.replicas == 2
    assert big.config_hash() != serial.config_hash()


@pytest.mark.slow
def test_sweep_on_two_ray_nodes_equals_serial(tmp_path: Path) -> None:
    """Points run on both nodes of a two-node cluster (one CPU each), a killed worker's point runs again, and
    points.csv and requests.parquet equal a serial run's. In a process of its own: the session's Ray is local."""
    import json
    import os
    import subprocess
    import sys

    campaign = tmp_path / "c.yaml"
    campaign.write_text(yaml.safe_dump(_campaign_data()))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fleet_twonode_scenario.py"), str(campaign)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"scenario failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert len(out["nodes"]) == 2 and sorted(out["used"]) == sorted(out["nodes"]), out["ran_on"]
    assert out["killed"] and out["rerun_noted"]
    assert out["points"] == [0, 1, 2, 3]  # every point once
    assert out["same_points"] and out["same_requests"] and out["requests"] > 0


def test_record_writer_streams_in_request_order_and_holds_little() -> None:
    """Records finishing out of order are written in request order, a chunk at a time; what is held at once is the
    chunk and the requests finished ahead of a slower one, not the point; written records lose their ITL lists."""
    from workloads.client import RequestRecord
    from workloads.results import SUMMARY_COLUMNS, RecordWriter

    chunks: list = []
    writer = RecordWriter(chunks.append, chunk_rows=10)
    records = [RequestRecord(0, i, i * 0.1, 8, 4, output_tokens=4, itl_s=[0.01, 0.02, 0.03], status="ok")
               for i in range(1000)]
    order = [i + 1 if i % 4 == 0 else i - 1 if i % 4 == 1 else i for i in range(1000)]  # pairs swapped
    for i in order:
        writer.add(records[i])
    scalars = writer.close()
    table = pa.concat_tables(chunks)
    assert table.column("request_index").to_pylist() == list(range(1000))
    assert table.column("itl_s").to_pylist() == [[0.01, 0.02, 0.03]] * 1000
    assert len(chunks) == 100 and writer.peak_held <= 11
    assert all(r.itl_s == [] for r in records)
    assert list(scalars.columns) == SUMMARY_COLUMNS and scalars["request_index"].tolist() == list(range(1000))


def test_a_long_point_never_holds_all_its_records(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A virtual point of ~1,200 requests in 64-row chunks: the point's writer never held more than a few chunks'
    worth (it would hold every record if they were written at the end), and the results equal a run written in
    one chunk."""
    import pyarrow.parquet as pq

    import deploy.virtual
    from workloads import results

    writers: list[results.RecordWriter] = []

    class Tracked(results.RecordWriter):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            writers.append(self)

    data = _campaign_data()
    data["workload"]["duration_s"] = 120
    data["sweep"] = {"rate_rps": [10]}
    spec = CampaignFile.model_validate(data)
    whole = run_virtual_campaign(spec, spec.deployment, tmp_path / "whole")
    monkeypatch.setattr(results, "CHUNK_ROWS", 64)
    monkeypatch.setattr(deploy.virtual, "RecordWriter", Tracked)
    chunked = run_virtual_campaign(spec, spec.deployment, tmp_path / "chunked")
    (writer,) = writers
    assert writer.rows == whole["requests"].iloc[0] > 1000
    assert writer.peak_held < 4 * 64  # the chunk plus those that finished ahead of a slower request
    assert pq.ParquetFile(tmp_path / "chunked" / "parts" / "point-0000.parquet").num_row_groups > 10
    _same(whole, chunked)
    pd.testing.assert_frame_equal(*(pd.read_parquet(tmp_path / d / "requests.parquet") for d in ("whole", "chunked")))


def test_derived_tables_are_rebuilt_once_and_only_when_stale(tmp_path: Path) -> None:
    """requests.parquet is written when the campaign ends; `testbed report`/--resume leave it alone while it is
    newer than points.csv (a long campaign's is gigabytes) and rebuild it, the same, when a point came after it."""
    import os

    from workloads.results import ResultStore

    spec = _campaign(tmp_path)
    run_virtual_campaign(spec, spec.deployment, tmp_path / "out")
    store = ResultStore(tmp_path / "out")
    built = store.requests_path.stat().st_mtime_ns
    before = store.requests()
    store.repair()
    assert store.requests_path.stat().st_mtime_ns == built
    later = built + 10**9
    os.utime(store.points_path, ns=(later, later))  # as if a point were written after the rebuild
    store.repair()
    assert store.requests_path.stat().st_mtime_ns > built
    pd.testing.assert_frame_equal(store.requests(), before)
    assert store.requests(["point", "status"]).columns.tolist() == ["point", "status"]
