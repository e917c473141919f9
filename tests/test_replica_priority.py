"""Replicas run at the front door's priority, not at Ray's worker niceness of 15 (serving.replica)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.replica import run_at_normal_priority

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, os, threading
os.nice(15)  # as Ray starts its workers
stop = threading.Event()
worker = threading.Thread(target=stop.wait)  # a thread that exists before the reset, as Ray's do
worker.start()
from serving.replica import run_at_normal_priority
result = run_at_normal_priority("replica-0")
late = threading.Thread(target=stop.wait)  # created after: inherits its creator's niceness
late.start()
tids = [int(t) for t in os.listdir("/proc/self/task")]
print(json.dumps({"result": result, "threads": [os.getpriority(os.PRIO_PROCESS, t) for t in tids]}))
stop.set()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a niceness needs root (CAP_SYS_NICE)")
def test_every_thread_of_a_reniced_worker_goes_back_to_zero() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["result"] == 0
    assert len(seen["threads"]) >= 3 and set(seen["threads"]) == {0}


def test_without_the_privilege_the_replica_keeps_its_niceness_and_says_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(which: int, who: int, prio: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "getpriority", lambda which, who: 15)
    monkeypatch.setattr(os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger="serving.replica"):
        assert run_at_normal_priority("replica-3") == 15
    assert "replica-3 runs at niceness 15" in caplog.text and "RAY_worker_niceness=0" in caplog.text


def test_a_process_at_normal_priority_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(os, "getpriority", lambda which, who: 0)
    monkeypatch.setattr(os, "setpriority", lambda *a: calls.append(a))
    assert run_at_normal_priority("replica-0") == 0 and calls == []
