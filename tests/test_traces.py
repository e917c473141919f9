from pathlib import Path

import numpy as np
import pytest

from workloads.arrivals import GammaArrivals, TraceArrivals, build_trace_requests
from workloads.traces import TraceError, load_trace, replay_window

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_azure_trace() -> None:
    tr = load_trace("azure_conv_2023")
    assert len(tr) == 19366
    assert tr.t_s[0] == 0 and np.all(np.diff(tr.t_s) >= 0)
    assert tr.mean_rate_rps == pytest.approx(5.5, rel=0.02)  # 19,366 requests over 58 minutes
    assert tr.prompt_tokens.mean() == pytest.approx(1155, rel=0.01)
    assert tr.output_tokens.mean() == pytest.approx(211, rel=0.01)


def test_azure_fractional_seconds_are_kept(tmp_path) -> None:
    p = write(tmp_path, AZURE_HEADER + "2023-11-16 18:15:46.6805900,10,5\n2023-11-16 18:15:47.0000001,20,6\n")
    tr = load_trace(str(p))
    assert tr.t_s[1] == pytest.approx(0.3194101, abs=1e-6)
    assert tr.prompt_tokens.tolist() == [10, 20]


def test_burstgpt_format(tmp_path) -> None:
    p = write(tmp_path, "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                        "5,ChatGPT,100,20,120,Conversation log\n7.5,GPT-4,50,10,60,API log\n")
    tr = load_trace(str(p))
    assert tr.t_s.tolist() == [0.0, 2.5] and tr.output_tokens.tolist() == [20, 10]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:00:00,1\n", "line 1: azure trace lacks column(s) GeneratedTokens"),
        ("when,prompt,output\n1,2,3\n", "line 1: unknown trace header"),
        (AZURE_HEADER + "2023-11-16 18:00:01,5,5\n2023-11-16 18:00:00,5,5\n",
         "line 3, column TIMESTAMP: timestamp '2023-11-16 18:00:00' is earlier"),
        (AZURE_HEADER + "2023-11-16 18:00:01,5,-3\n", "line 2, column GeneratedTokens: token count must be positive"),
        (AZURE_HEADER + "2023-11-16 18:00:01,abc,3\n", "line 2, column ContextTokens: not a token count"),
        (AZURE_HEADER + "yesterday,1,3\n", "line 2, column TIMESTAMP: bad timestamp"),
        ("", "the file is empty"),
    ],
)
def test_malformed_traces_name_file_line_and_column(tmp_path, body, message) -> None:
    p = write(tmp_path, body)
    with pytest.raises(TraceError) as err:
        load_trace(str(p))
    assert str(p) in str(err.value) and message in str(err.value)


def test_skip_bad_rows_counts_them(tmp_path) -> None:
    p = write(tmp_path, AZURE_HEADER + "2023-11-16 18:00:01,5,5\n2023-11-16 18:00:00,5,5\n"
                                       "2023-11-16 18:00:02,5,-1\n2023-11-16 18:00:03,7,7\n")
    tr = load_trace(str(p), skip_bad_rows=True)
    assert len(tr) == 2 and tr.skipped_rows == 2


def test_missing_trace_names_the_choices() -> None:
    with pytest.raises(TraceError, match="azure_conv_2023"):
        load_trace("no/such/trace.csv")


def test_window_speedup_and_sampling() -> None:
    tr = load_trace("azure_conv_2023")
    w = replay_window(tr, start_s=600, duration_s=600, speedup=2.0)
    assert w.t_s.max() < 300 and w.t_s.min() >= 0
    expected = int(((tr.t_s >= 600) & (tr.t_s < 1200)).sum())
    assert len(w) == expected
    half = replay_window(tr, start_s=600, duration_s=600, sample=0.5, seed=1)
    assert len(half) == pytest.approx(expected / 2, rel=0.1)
    assert len(replay_window(tr, start_s=600, duration_s=600, sample=0.5, seed=1)) == len(half)  # seeded


def test_trace_requests_hit_the_target_rate() -> None:
    reqs = build_trace_requests(TraceArrivals(path="azure_conv_2023", start_s=0), 11.0, 300, seed=0)
    assert len(reqs) / 300 == pytest.approx(11.0, rel=0.15)
    assert all(r.prompt_tokens > 0 for r in reqs) and max(r.t_s for r in reqs) < 300


def test_gamma_burstiness() -> None:
    t = np.array(list(GammaArrivals(cv=3.0).times(np.random.default_rng(0), 20.0, 2000.0)))
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)


def test_trace_lengths_follow_the_trace_columns(tmp_path) -> None:
    from workloads.arrivals import TraceLength
    from workloads.spec import WorkloadSpec

    p = write(tmp_path, AZURE_HEADER + "".join(f"2023-11-16 18:00:{i:02d},{10 * (i % 3 + 1)},{i % 2}\n"
                                               for i in range(30)))
    w = WorkloadSpec.model_validate({"prompt_tokens": {"kind": "trace", "path": str(p)},
                                     "output_tokens": {"kind": "trace", "path": str(p), "max": 1}})
    assert w.prompt_tokens.column == "prompt" and w.output_tokens.column == "output"  # type: ignore[union-attr]
    rng = np.random.default_rng(4)
    prompts = w.prompt_tokens.sample(rng, 30_000)
    # The empirical distribution: only values of the column, at their frequencies (1/3 each).
    assert set(prompts.tolist()) == {10, 20, 30}
    for v in (10, 20, 30):
        assert (prompts == v).mean() == pytest.approx(1 / 3, abs=0.015)
    # Zero output counts in the trace are clipped to min (1): a request must ask for a token.
    assert set(w.output_tokens.sample(rng, 1000).tolist()) == {1}
    a = TraceLength(path=str(p), column="prompt").sample(np.random.default_rng(1), 50)
    assert a.tolist() == TraceLength(path=str(p), column="prompt").sample(np.random.default_rng(1), 50).tolist()


def test_shipped_trace_lengths_match_the_trace() -> None:
    from workloads.arrivals import TraceLength

    x = TraceLength(path="azure_conv_2023", column="output").sample(np.random.default_rng(0), 50_000)
    assert x.mean() == pytest.approx(load_trace("azure_conv_2023").output_tokens.clip(1).mean(), rel=0.03)


def test_trace_lengths_bad_file_and_bounds(tmp_path) -> None:
    from pydantic import ValidationError

    from workloads.arrivals import TraceLength

    with pytest.raises(ValidationError, match=r"max \(5\) must be >= min \(10\)"):
        TraceLength(path="azure_conv_2023", min=10, max=5)
    p = write(tmp_path, AZURE_HEADER + "2023-11-16 18:00:01,5,5\n2023-11-16 18:00:02,x,5\n")
    with pytest.raises(TraceError, match="line 3, column ContextTokens"):
        TraceLength(path=str(p), column="prompt").sample(np.random.default_rng(0), 3)
    assert TraceLength(path=str(p), column="prompt", skip_bad_rows=True).sample(
        np.random.default_rng(0), 3).tolist() == [5, 5, 5]


def test_rate_scaling_keeps_the_trace_clock_and_samples_requests() -> None:
    tr = load_trace("azure_conv_2023")
    reqs = build_trace_requests(TraceArrivals(path="azure_conv_2023", start_s=600, speedup=1.0), 2.0, 300, seed=3)
    assert len(reqs) / 300 == pytest.approx(2.0, rel=0.1)
    # Every request is one of the window's own, at its own (unscaled) offset: a subset, not a compression.
    own = {round(float(t) - 600, 6) for t in tr.t_s[(tr.t_s >= 600) & (tr.t_s < 900)]}
    assert {round(r.t_s, 6) for r in reqs} <= own
    fast = build_trace_requests(TraceArrivals(path="azure_conv_2023", speedup=4.0), 10.0, 200, seed=3)
    assert len(fast) / 200 == pytest.approx(10.0, rel=0.1) and max(r.t_s for r in fast) < 200
    with pytest.raises(TraceError, match=r"fewer than the 50 requests/s asked for: raise speedup"):
        build_trace_requests(TraceArrivals(path="azure_conv_2023", speedup=1.0), 50.0, 100, seed=0)


def test_time_scaling_with_sampling_still_hits_the_rate() -> None:
    reqs = build_trace_requests(TraceArrivals(path="azure_conv_2023", sample=0.25), 11.0, 300, seed=0)
    assert len(reqs) / 300 == pytest.approx(11.0, rel=0.15)


def test_azure_2024_timestamps_with_a_zone(tmp_path) -> None:
    """The 2024 Azure traces write ``+00:00``; offsets are honoured, so rows in different zones order correctly."""
    p = write(tmp_path, AZURE_HEADER + "2024-05-10 00:00:00.009930+00:00,2162,5\n"
                                       "2024-05-10T02:00:00.5+02:00,100,50\n2024-05-10 00:00:01Z,7,0\n")
    tr = load_trace(str(p))
    assert tr.t_s == pytest.approx([0.0, 0.49007, 0.99007], abs=1e-6)
    assert tr.prompt_tokens.tolist() == [2162, 100, 7] and tr.output_tokens.tolist() == [5, 50, 0]


def test_zoneless_timestamps_are_utc_whatever_the_hosts_zone(tmp_path, monkeypatch) -> None:
    """Read as local time, the hour Berlin skips on 2023-03-26 would vanish from the trace's clock."""
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        p = write(tmp_path, AZURE_HEADER + "2023-03-26 01:59:59,5,5\n2023-03-26 03:00:00,5,5\n")
        assert load_trace(str(p)).t_s.tolist() == [0.0, 3601.0]
    finally:
        monkeypatch.undo()
        time.tzset()


MOONCAKE = (
    '{"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1, 2]}\n'
    '{"timestamp": 1500, "input_length": 512, "output_length": 9, "hash_ids": [0, 3]}\n'
    "\n"
    '{"timestamp": 4000, "input_length": 100, "output_length": 1, "hash_ids": []}\n'
)


def test_mooncake_jsonl_format(tmp_path) -> None:
    tr = load_trace(str(write(tmp_path, MOONCAKE, "trace.jsonl")))
    assert tr.t_s.tolist() == [0.0, 1.5, 4.0]  # milliseconds in the file
    assert tr.prompt_tokens.tolist() == [6955, 512, 100] and tr.output_tokens.tolist() == [52, 9, 1]
    reqs = build_trace_requests(TraceArrivals(path=str(tmp_path / "trace.jsonl")), 1.0, 10.0, seed=0)
    assert [r.prompt_tokens for r in reqs] == [6955, 512, 100]  # replayed like a CSV trace


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (MOONCAKE + "not json\n", "line 5: not a JSON object"),
        (MOONCAKE + "[1, 2]\n", "line 5: not a JSON object (a JSON list, not an object)"),
        (MOONCAKE + '{"timestamp": 5000, "input_length": 3}\n', "line 5: record lacks key(s) output_length"),
        (MOONCAKE + '{"timestamp": 3000, "input_length": 3, "output_length": 1}\n',
         "line 5, column timestamp: timestamp 3000 is earlier"),
        (MOONCAKE + '{"timestamp": "soon", "input_length": 3, "output_length": 1}\n',
         "line 5, column timestamp: bad timestamp 'soon'"),
        (MOONCAKE + '{"timestamp": 5000, "input_length": null, "output_length": 1}\n',
         "line 5, column input_length: not a token count: None"),
        (MOONCAKE + '{"timestamp": null, "input_length": 3, "output_length": 1}\n',
         "line 5, column timestamp: bad timestamp None"),
        ('{"t": 0, "in": 3}\n', "line 1: unknown trace header ['t', 'in']; expected columns"),
        ('{"timestamp": 0, "input_length": 3}\n', "line 1: mooncake trace lacks column(s) output_length"),
    ],
)
def test_malformed_jsonl_traces_name_file_line_and_key(tmp_path, body, message) -> None:
    p = write(tmp_path, body, "trace.jsonl")
    with pytest.raises(TraceError) as err:
        load_trace(str(p))
    assert str(p) in str(err.value) and message in str(err.value)


def test_jsonl_skip_bad_rows_counts_them(tmp_path) -> None:
    p = write(tmp_path, "{oops\n" + MOONCAKE + '{"timestamp": 1}\n[]\n', "trace.jsonl")
    tr = load_trace(str(p), skip_bad_rows=True)
    assert len(tr) == 3 and tr.skipped_rows == 3
    with pytest.raises(TraceError, match=r"no JSON object on any line \(2 skipped\)"):
        load_trace(str(write(tmp_path, "{oops\n[1, 2]\n", "bad.jsonl")), skip_bad_rows=True)
