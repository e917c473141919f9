"""Start a deployment as a child process (``testbed serve``) for a campaign, and stop it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from deploy.config import DeploymentConfig
from deploy.raycluster import ray_env
from profilers.errors import TestbedError


class DeploymentStartError(TestbedError, RuntimeError):
    """A deployment started for a campaign did not come up; the message says why."""


class LocalDeployment:
    """``with LocalDeployment(cfg, log) as url:`` runs the front door and replicas in their own process,
    so the load generator and the server do not share an interpreter (and its GIL)."""

    def __init__(self, config: DeploymentConfig, log_path: Path, start_timeout_s: float = 180.0) -> None:
        self.config = config.model_copy(update={"port": 0, "host": "127.0.0.1"})
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        # serve removes the directory itself (it holds the control token), even when this process was killed
        self._tmp = tempfile.TemporaryDirectory(prefix="testbed-deploy-", ignore_cleanup_errors=True)

    def __enter__(self) -> str:
        tmp = Path(self._tmp.name)
        cfg_path, ready = tmp / "serving.yaml", tmp / "ready"
        cfg_path.write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
        env = {**os.environ, **ray_env(), "PYTHONUNBUFFERED": "1"}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "serve", str(cfg_path), "--ready-file", str(ready),
             "--parent-pid", str(os.getpid()), "--remove-on-exit", str(tmp)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DeploymentStartError(
                    f"the deployment exited with code {self.proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if ready.exists() and ready.read_text():
                url = ready.read_text().strip()
                if _healthy(url):
                    return url
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise DeploymentStartError(
            f"the deployment did not become ready in {self.start_timeout_s:.0f} s; see {self.log_path}"
        )

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)  # a vLLM engine on a busy host takes its time to shut down
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._tmp.cleanup()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
