"""`testbed dashboards push` through grafana-client.

No Grafana server can be installed here (none is packaged for Debian, PyPI or npm), so these tests run the
real client against a stand-in on 127.0.0.1 that implements the few Grafana HTTP endpoints the push uses
(health via /api/frontend/settings, folders, datasources by uid, dashboards) and records every request.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

pytest.importorskip("grafana_client", reason="grafana-client is not installed: pip install -e '.[deploy]'")

from deploy.cli import main
from deploy.dashboards import all_dashboards
from deploy.grafana import DATASOURCE_UID, FOLDER_UID, GrafanaPushError, push_dashboards

TOKEN = "glsa_test_token"


@dataclass
class FakeGrafana:
    """State of the stand-in: what a Grafana would hold, plus a log of requests."""

    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    fail_dashboard_uid: str | None = None

    def handle(self, method: str, path: str, auth: str | None, body: Any) -> tuple[int, Any]:
        self.requests.append((method, path, body))
        if auth != f"Bearer {TOKEN}":
            return 401, {"message": "Invalid API key"}
        routes = [
            ("GET", r"/api/frontend/settings", lambda: (200, {"buildInfo": {"version": "11.3.0"}})),
            ("GET", r"/api/folders/(?P<uid>[^/]+)", lambda uid: self._get(self.folders, uid, "folder")),
            ("POST", r"/api/folders", lambda: self._put(self.folders, body["uid"], body)),
            ("DELETE", r"/api/folders/(?P<uid>[^/]+)", lambda uid: self._delete(self.folders, uid)),
            (
                "GET",
                r"/api/datasources/uid/(?P<uid>[^/]+)",
                lambda uid: self._get(self.datasources, uid, "ds"),
            ),
            ("POST", r"/api/datasources", lambda: self._put(self.datasources, body["uid"], body)),
            (
                "PUT",
                r"/api/datasources/uid/(?P<uid>[^/]+)",
                lambda uid: self._put(self.datasources, uid, body),
            ),
            (
                "DELETE",
                r"/api/datasources/uid/(?P<uid>[^/]+)",
                lambda uid: self._delete(self.datasources, uid),
            ),
            ("GET", r"/api/dashboards/uid/(?P<uid>[^/]+)", lambda uid: self._get_dashboard(uid)),
            ("POST", r"/api/dashboards/db", lambda: self._save_dashboard(body)),
            ("DELETE", r"/api/dashboards/uid/(?P<uid>[^/]+)", lambda uid: self._delete(self.dashboards, uid)),
        ]
        for m, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                return fn(**match.groupdict())
        return 404, {"message": "Not found"}

    def _get(self, store: dict[str, Any], uid: str, what: str) -> tuple[int, Any]:
        return (200, store[uid]) if uid in store else (404, {"message": f"{what} not found"})

    def _put(self, store: dict[str, Any], uid: str, body: dict[str, Any]) -> tuple[int, Any]:
        store[uid] = body
        return 200, {"uid": uid, "message": "saved"}

    def _delete(self, store: dict[str, Any], uid: str) -> tuple[int, Any]:
        if uid not in store:
            return 404, {"message": "not found"}
        del store[uid]
        return 200, {"message": "deleted"}

    def _get_dashboard(self, uid: str) -> tuple[int, Any]:
        if uid not in self.dashboards:
            return 404, {"message": "Dashboard not found"}
        saved = self.dashboards[uid]
        return 200, {"dashboard": saved["dashboard"], "meta": {"folderUid": saved.get("folderUid")}}

    def _save_dashboard(self, body: dict[str, Any]) -> tuple[int, Any]:
        uid = body["dashboard"]["uid"]
        if uid == self.fail_dashboard_uid:
            return 500, {"message": "database is locked"}
        if body.get("folderUid") and body["folderUid"] not in self.folders:
            return 400, {"message": "folder not found"}
        self.dashboards[uid] = body
        return 200, {"status": "success", "uid": uid, "url": f"/d/{uid}"}


@pytest.fixture
def grafana() -> Iterator[tuple[str, FakeGrafana]]:
    state = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, payload = state.handle(
                self.command, self.path.split("?")[0], self.headers.get("authorization"), body
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_push_creates_datasource_folder_and_dashboards(grafana: tuple[str, FakeGrafana]) -> None:
    url, state = grafana
    result = push_dashboards(url, TOKEN, "http://prometheus:9090")
    assert state.requests[0][:2] == ("GET", "/api/frontend/settings")
    assert set(state.folders) == {FOLDER_UID}
    assert state.datasources[DATASOURCE_UID]["url"] == "http://prometheus:9090"
    assert state.datasources[DATASOURCE_UID]["type"] == "prometheus"
    uids = [d.uid for d in all_dashboards()]
    assert sorted(state.dashboards) == sorted(uids) == sorted(result.dashboards)
    for saved in state.dashboards.values():
        assert saved["folderUid"] == FOLDER_UID and saved["overwrite"] is True
        ds_var = next(v for v in saved["dashboard"]["templating"]["list"] if v["type"] == "datasource")
        assert ds_var["current"]["value"] == DATASOURCE_UID
    # A second push updates in place.
    push_dashboards(url, TOKEN, "http://prometheus-2:9090")
    assert ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}") in [r[:2] for r in state.requests]
    assert state.datasources[DATASOURCE_UID]["url"] == "http://prometheus-2:9090"
    assert len(state.dashboards) == len(uids)


def test_cli_push_prints_dashboard_urls(grafana: tuple[str, FakeGrafana], capsys, monkeypatch) -> None:
    url, _ = grafana
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    assert main(["dashboards", "push", "--grafana-url", url]) == 0
    out = capsys.readouterr().out.split()
    assert out == [f"{url}/d/{d.uid}" for d in all_dashboards()]


def test_rejected_token_is_one_line_with_the_status(grafana: tuple[str, FakeGrafana], capsys) -> None:
    url, state = grafana
    assert main(["dashboards", "push", "--grafana-url", url, "--token", "wrong"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: Grafana at {url} rejected the credentials (HTTP 401 Unauthorized)")
    assert not state.folders and not state.datasources and not state.dashboards


def test_unreachable_grafana(capsys) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert main(["dashboards", "push", "--grafana-url", url, "--token", TOKEN, "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: Grafana unreachable at {url}: ConnectionError: [Errno 111] Connection refused\n"


def test_failed_push_leaves_no_partial_dashboards(grafana: tuple[str, FakeGrafana]) -> None:
    url, state = grafana
    state.fail_dashboard_uid = all_dashboards()[2].uid
    with pytest.raises(GrafanaPushError, match=r"answered HTTP 500: Server Error 500: database is locked"):
        push_dashboards(url, TOKEN, "http://prometheus:9090")
    assert not state.folders and not state.datasources and not state.dashboards
    deletes = [r[1] for r in state.requests if r[0] == "DELETE"]
    assert len(deletes) == 2 + 2  # the two dashboards pushed, the datasource and the folder


def test_failed_push_restores_what_it_overwrote(grafana: tuple[str, FakeGrafana]) -> None:
    url, state = grafana
    push_dashboards(url, TOKEN, "http://old:9090")
    before_ds = json.loads(json.dumps(state.datasources))
    first = all_dashboards()[0].uid
    state.dashboards[first]["dashboard"]["title"] = "edited by a user"
    state.fail_dashboard_uid = all_dashboards()[1].uid
    with pytest.raises(GrafanaPushError):
        push_dashboards(url, TOKEN, "http://new:9090")
    assert state.dashboards[first]["dashboard"]["title"] == "edited by a user"
    assert state.datasources == before_ds
    assert set(state.folders) == {FOLDER_UID}
