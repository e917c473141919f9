"""A local monitoring stack for one machine: Prometheus on 127.0.0.1 scraping a testbed, and Grafana
provisioning files for users who run Grafana themselves.

Prometheus is the distribution's binary (Debian: ``apt-get install --no-install-recommends prometheus``),
started with a generated config and a throw-away TSDB; ``up`` leaves it running and records its PID in a
state file, ``down`` stops exactly that process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from profilers.errors import TestbedError

INSTALL_HINT = (
    "install it with `apt-get install --no-install-recommends prometheus` (Debian/Ubuntu; the service "
    "need not run) or put a Prometheus 2.x binary on PATH, or pass --prometheus-bin PATH"
)
RAY_SD_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")


class MonitorError(TestbedError, RuntimeError):
    """The monitoring stack cannot start or stop; the message says what to do."""


def find_prometheus(explicit: str | None = None) -> str:
    """Path of the Prometheus binary (``explicit`` or on PATH); MonitorError with an install hint if none."""
    if explicit:
        if not (Path(explicit).is_file() and os.access(explicit, os.X_OK)):
            raise MonitorError(f"{explicit} is not an executable Prometheus binary; {INSTALL_HINT}")
        return explicit
    found = shutil.which("prometheus")
    if not found:
        raise MonitorError(f"Prometheus is not installed: {INSTALL_HINT}")
    return found


def scrape_target(url: str) -> tuple[str, str, str]:
    """(scheme, host:port, metrics path) of a testbed URL or of its /metrics URL."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname or parts.scheme not in ("http", "https"):
        raise MonitorError(f"cannot scrape {url!r}: give the testbed URL, e.g. http://127.0.0.1:8000")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path.rstrip("/")
    return parts.scheme, f"{parts.hostname}:{port}", path if path.endswith("/metrics") else f"{path}/metrics"


def prometheus_config(
    urls: list[str],
    scrape_interval: str = "5s",
    ray_sd_file: Path | None = None,
    rule_files: list[str] | None = None,
) -> dict[str, Any]:
    """Scrape every testbed URL (job ``testbed``) and Ray's service-discovery file (job ``ray``) if given."""
    jobs = []
    for i, url in enumerate(urls):
        scheme, target, path = scrape_target(url)
        jobs.append(
            {
                "job_name": "testbed" if i == 0 else f"testbed-{i}",
                "scheme": scheme,
                "metrics_path": path,
                "static_configs": [{"targets": [target]}],
            }
        )
    if ray_sd_file is not None:
        # Ray writes its metrics agents' addresses here (the head's --metrics-export-port and every node's).
        jobs.append({"job_name": "ray", "file_sd_configs": [{"files": [str(ray_sd_file)]}]})
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": jobs,
    }
    if rule_files:
        config["rule_files"] = rule_files
    return config


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (picked by the OS)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class MonitorState:
    """What ``testbed monitor up`` started, saved in its state dir so ``monitor down`` can stop it."""

    pid: int
    url: str
    workdir: str
    targets: list[str]

    @property
    def config_path(self) -> Path:
        """Path of the Prometheus config it runs with."""
        return Path(self.workdir) / "prometheus.yml"


class LocalPrometheus:
    """A Prometheus process on 127.0.0.1 with its own config and TSDB under ``workdir``."""

    def __init__(
        self, config: dict[str, Any], port: int = 0, binary: str | None = None, workdir: Path | None = None
    ) -> None:
        self.binary = find_prometheus(binary)
        self.config = config
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="testbed-prometheus-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Path of the Prometheus process's log."""
        return self.workdir / "prometheus.log"

    def start(self, detach: bool = False, ready_timeout_s: float = 30.0) -> LocalPrometheus:
        """Write the config (checked by promtool if present), start Prometheus and wait until it is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        promtool = promtool_for(self.binary)
        if promtool:  # fail with promtool's message rather than a Prometheus that exits at once
            check = subprocess.run(
                [promtool, "check", "config", str(config_path)], capture_output=True, text=True
            )
            if check.returncode != 0:
                raise MonitorError(f"generated Prometheus config is invalid:\n{check.stdout}{check.stderr}")
        cmd = [
            self.binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d",
            "--web.enable-lifecycle",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach
            )
        self._wait_ready(ready_timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise MonitorError(f"Prometheus exited with status {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise MonitorError(f"Prometheus did not become ready within {timeout_s:g} s (log: {self.log_path})")

    def stop(self) -> None:
        """Stop Prometheus (killed after 20 s) and remove its working directory if it was a temporary one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query (now, or at unix time ``at``); the ``result`` list, or Prometheus' error raised."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        r = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise MonitorError(f"query failed ({r.status_code}): {body.get('error')}: {expr}")
        return list(body["data"]["result"])


def promtool_for(binary: str) -> str | None:
    """Path of the ``promtool`` next to the Prometheus binary or on PATH; None if there is none."""
    sibling = Path(binary).with_name("promtool")
    return str(sibling) if sibling.exists() else shutil.which("promtool")


# --- `testbed monitor up/down`: a detached Prometheus remembered in a state file ----------------------------


def _state_file(state_dir: Path) -> Path:
    return state_dir / "monitor.json"


def _is_our_prometheus(state: MonitorState) -> bool:
    """The PID still runs the Prometheus we started (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.decode(errors="replace") == f"--config.file={state.config_path}" for arg in cmdline)


def read_state(state_dir: Path) -> MonitorState | None:
    """The monitor state saved in ``state_dir``, or None if nothing was started there."""
    path = _state_file(state_dir)
    if not path.exists():
        return None
    return MonitorState(**json.loads(path.read_text()))


def monitor_up(
    urls: list[str],
    state_dir: Path,
    port: int = 9090,
    scrape_interval: str = "5s",
    binary: str | None = None,
    ray: bool = True,
) -> MonitorState:
    """Start a detached Prometheus scraping ``urls`` (and Ray's targets) and save its state in ``state_dir``."""
    existing = read_state(state_dir)
    if existing is not None and _is_our_prometheus(existing):
        raise MonitorError(
            f"Prometheus already runs for this state dir (pid {existing.pid}, {existing.url}); "
            f"stop it with `testbed monitor down --state-dir {state_dir}`"
        )
    workdir = state_dir / "prometheus"
    if port and not _port_free(port):
        raise MonitorError(f"127.0.0.1:{port} is in use; choose another --port (0 picks a free one)")
    config = prometheus_config(urls, scrape_interval, RAY_SD_FILE if ray else None)
    prom = LocalPrometheus(config, port=port, binary=binary, workdir=workdir).start(detach=True)
    assert prom.proc is not None
    state = MonitorState(pid=prom.proc.pid, url=prom.url, workdir=str(workdir), targets=list(urls))
    _state_file(state_dir).write_text(json.dumps(asdict(state), indent=2))
    return state


def monitor_down(state_dir: Path, timeout_s: float = 20.0) -> MonitorState:
    """Stop the Prometheus started from ``state_dir``, delete its TSDB and state; returns what was stopped."""
    state = read_state(state_dir)
    if state is None:
        raise MonitorError(
            f"no monitor state in {state_dir}: nothing was started with `testbed monitor up` there"
        )
    if _is_our_prometheus(state):
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_our_prometheus(state) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(state.pid, os.WNOHANG)
            time.sleep(0.1)
        if _is_our_prometheus(state):
            os.kill(state.pid, signal.SIGKILL)
    shutil.rmtree(Path(state.workdir) / "tsdb", ignore_errors=True)
    _state_file(state_dir).unlink()
    return state


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- Grafana provisioning for a Grafana the user runs ------------------------------------------------------


def grafana_provisioning(out_dir: Path, prometheus_url: str, dashboards_dir: Path) -> list[Path]:
    """Write provisioning/datasources and provisioning/dashboards files (Grafana's file provisioning format).

    Point Grafana at it with ``GF_PATHS_PROVISIONING=<out_dir>/provisioning``; the dashboards are copied to
    ``<out_dir>/dashboards``.
    """
    from deploy.dashboards import export

    prov = out_dir / "provisioning"
    (prov / "datasources").mkdir(parents=True, exist_ok=True)
    (prov / "dashboards").mkdir(parents=True, exist_ok=True)
    dashboards = export(dashboards_dir)
    datasource = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus (testbed)",
                "uid": "testbed-prometheus",
                "type": "prometheus",
                "access": "proxy",
                "url": prometheus_url,
                "isDefault": True,
                "jsonData": {"timeInterval": "5s"},
            }
        ],
    }
    provider = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "llm-energy-testbed",
                "folder": "LLM energy",
                "type": "file",
                "disableDeletion": False,
                "updateIntervalSeconds": 30,
                "allowUiUpdates": True,
                "options": {"path": str(dashboards_dir.resolve()), "foldersFromFilesStructure": False},
            }
        ],
    }
    ds_path, db_path = prov / "datasources" / "testbed.yaml", prov / "dashboards" / "testbed.yaml"
    ds_path.write_text(yaml.safe_dump(datasource, sort_keys=False))
    db_path.write_text(yaml.safe_dump(provider, sort_keys=False))
    return [ds_path, db_path, *dashboards]
