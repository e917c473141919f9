"""A real Prometheus server for integration tests: loopback only, generated config, temporary TSDB."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

DEFAULT_BINARY = "/usr/bin/prometheus"
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"


def prometheus_binary() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    return DEFAULT_BINARY if Path(DEFAULT_BINARY).is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PromServer:
    """Prometheus scraping ``targets`` (``host:port``) every ``interval``; use as a context manager."""

    def __init__(self, targets: list[str], interval: str = "100ms", metrics_path: str = "/metrics") -> None:
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError(f"no prometheus binary on PATH or at {DEFAULT_BINARY}: {INSTALL_HINT}")
        self.binary = binary
        self.targets = targets
        self.interval = interval
        self.metrics_path = metrics_path
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="testbed-prom-"))
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        targets = ", ".join(f'"{t}"' for t in self.targets)
        return (
            "global:\n"
            f"  scrape_interval: {self.interval}\n"
            f"  scrape_timeout: {self.interval}\n"
            "scrape_configs:\n"
            "  - job_name: testbed\n"
            f"    metrics_path: {self.metrics_path}\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n"
        )

    def start(self, timeout_s: float = 30.0) -> PromServer:
        config = self._dir / "prometheus.yml"
        config.write_text(self._config())
        log = (self._dir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self._dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout_s:g} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        path = self._dir / "prometheus.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        resp = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10.0)
        body = resp.json()
        if body.get("status") != "success":
            raise RuntimeError(f"PromQL {expr!r} failed: {body.get('error', resp.text)}")
        return list(body["data"]["result"])

    def scalar(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        if len(result) != 1:
            raise RuntimeError(f"PromQL {expr!r} returned {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def wait_for_scrapes(self, n: int = 3, timeout_s: float = 30.0) -> None:
        """Until every target has been scraped successfully ``n`` times."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.query("sum_over_time(up[5m])")  # successful scrapes (a timed-out one counts 0)
            if len(got) == len(self.targets) and all(float(r["value"][1]) >= n for r in got):
                return
            time.sleep(0.2)
        raise RuntimeError(f"prometheus did not scrape {self.targets} {n} times: {self.query('up')}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PromServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
