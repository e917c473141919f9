"""Upload the Prometheus datasource and the dashboards to a Grafana server through grafana-client.

All or nothing: when any step fails, what this push created is deleted and what it overwrote is put back,
so a failed push leaves no partial set of dashboards behind.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deploy.dashboards import all_dashboards, to_json
from profilers.errors import TestbedError

DATASOURCE_UID = "testbed-prometheus"
FOLDER_UID = "llm-energy"


class GrafanaPushError(TestbedError, RuntimeError):
    """A push that failed; the message is one line with the HTTP status where there is one."""


@dataclass
class PushResult:
    """What a push created or updated: folder and datasource uids, dashboard uids, Grafana URL."""

    folder_uid: str
    datasource_uid: str
    dashboards: list[str]
    url: str


@dataclass
class _Undo:
    steps: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def add(self, what: str, fn: Callable[[], object]) -> None:
        self.steps.append((what, fn))

    def run(self) -> list[str]:
        failed = []
        for what, fn in reversed(self.steps):
            try:
                fn()
            except Exception as e:  # keep undoing the rest; report what could not be undone
                failed.append(f"{what} ({e})")
        return failed


def _status(e: Exception) -> int | None:
    return getattr(e, "status_code", None)


def _describe(e: Exception, url: str) -> str:
    import niquests
    from grafana_client.client import GrafanaException

    if isinstance(e, GrafanaException):
        if e.status_code == 401:
            return f"Grafana at {url} rejected the credentials (HTTP 401 Unauthorized): check --token"
        if e.status_code == 403:
            return (
                f"Grafana at {url} refused the request (HTTP 403 Forbidden): the token needs the Editor role"
            )
        return f"Grafana at {url} answered HTTP {e.status_code}: {e.message}"
    if isinstance(e, niquests.exceptions.RequestException):
        text = str(e)
        # The OS reason inside urllib3's long message.
        found = re.search(r"\[Errno -?\d+\] [^'\")]+|Failed to resolve '[^']+'", text)
        reason = found.group(0) if found else (text.splitlines()[0] if text else type(e).__name__)
        return f"Grafana unreachable at {url}: {type(e).__name__}: {reason}"
    return f"push to Grafana at {url} failed: {type(e).__name__}: {e}"


def _get_or_none(fn: Callable[[], Any]) -> Any:
    from grafana_client.client import GrafanaClientError

    try:
        return fn()
    except GrafanaClientError as e:
        if _status(e) == 404:
            return None
        raise


def push_dashboards(
    grafana_url: str,
    token: str | None,
    prometheus_url: str,
    folder_title: str = "LLM energy",
    timeout_s: float = 10.0,
) -> PushResult:
    """Create or update the folder, the Prometheus datasource and every dashboard; roll back on failure."""
    try:
        from grafana_client import GrafanaApi
    except ImportError as e:
        raise GrafanaPushError(
            "grafana-client is not installed: pip install 'llm-energy-testbed[deploy]'"
        ) from e

    # The client logs connection failures itself; the raised GrafanaPushError already says it in one line.
    logging.getLogger("grafana_client").setLevel(logging.CRITICAL + 1)
    api = GrafanaApi.from_url(grafana_url, credential=token or None, timeout=timeout_s)
    undo = _Undo()
    pushed: list[str] = []
    try:
        api.connect()  # GET /api/frontend/settings: reachability and credentials
        if _get_or_none(lambda: api.folder.get_folder(FOLDER_UID)) is None:
            api.folder.create_folder(folder_title, uid=FOLDER_UID)
            undo.add(f"folder {FOLDER_UID}", lambda: api.folder.delete_folder(FOLDER_UID))
        datasource = {
            "uid": DATASOURCE_UID,
            "name": "Prometheus (llm-energy-testbed)",
            "type": "prometheus",
            "access": "proxy",
            "url": prometheus_url,
            "jsonData": {"timeInterval": "5s"},
        }
        old_ds = _get_or_none(lambda: api.datasource.get_datasource_by_uid(DATASOURCE_UID))
        if old_ds is None:
            api.datasource.create_datasource(datasource)
            undo.add(
                f"datasource {DATASOURCE_UID}",
                lambda: api.datasource.delete_datasource_by_uid(DATASOURCE_UID),
            )
        else:
            api.datasource.update_datasource_by_uid(DATASOURCE_UID, {**old_ds, **datasource})
            undo.add(
                f"datasource {DATASOURCE_UID}",
                lambda: api.datasource.update_datasource_by_uid(DATASOURCE_UID, old_ds),
            )
        for d in all_dashboards():
            body = _bind_datasource(to_json(d), datasource)
            old = _get_or_none(lambda uid=d.uid: api.dashboard.get_dashboard(uid))
            api.dashboard.update_dashboard(
                {
                    "dashboard": body,
                    "folderUid": FOLDER_UID,
                    "overwrite": True,
                    "message": "llm-energy-testbed dashboards push",
                }
            )
            if old is None:
                undo.add(f"dashboard {d.uid}", lambda uid=d.uid: api.dashboard.delete_dashboard(uid))
            else:
                restore = {
                    "dashboard": {**old["dashboard"], "id": None},
                    "overwrite": True,
                    "folderUid": old.get("meta", {}).get("folderUid", FOLDER_UID),
                }
                undo.add(f"dashboard {d.uid}", lambda r=restore: api.dashboard.update_dashboard(r))
            pushed.append(d.uid)
    except Exception as e:
        message = _describe(e, grafana_url)
        not_undone = undo.run()
        if not_undone:
            message += f"; could not roll back: {', '.join(not_undone)}"
        raise GrafanaPushError(message) from e
    return PushResult(FOLDER_UID, DATASOURCE_UID, pushed, grafana_url.rstrip("/"))


def _bind_datasource(dashboard: dict[str, Any], datasource: dict[str, Any]) -> dict[str, Any]:
    """Select the pushed datasource in the dashboard's datasource variable."""
    body = copy.deepcopy(dashboard)
    for var in body["templating"]["list"]:
        if var["type"] == "datasource":
            var["current"] = {"text": datasource["name"], "value": datasource["uid"]}
    return body
