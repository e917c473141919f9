"""``testbed dashboards ...`` and ``testbed monitor ...``: Grafana dashboards and the local Prometheus."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from pathlib import Path

DEFAULT_STATE_DIR = Path("runs/monitor")


def cmd_dashboards_export(args: argparse.Namespace) -> int:
    """``testbed dashboards export``: write each dashboard as ``<uid>.json`` into a directory."""
    from deploy.dashboards import export

    for path in export(Path(args.dir)):
        print(path)
    return 0


def cmd_dashboards_provision(args: argparse.Namespace) -> int:
    """``testbed dashboards provision``: write Grafana provisioning files (datasource and dashboards)."""
    from deploy.monitoring import grafana_provisioning

    out = Path(args.out)
    for path in grafana_provisioning(out, args.prometheus_url, out / "dashboards"):
        print(path)
    print(f"run Grafana with GF_PATHS_PROVISIONING={(out / 'provisioning').resolve()}")
    return 0


def cmd_dashboards_push(args: argparse.Namespace) -> int:
    """``testbed dashboards push``: push the dashboards to a Grafana through its API and print their URLs."""
    from deploy.grafana import push_dashboards

    token = args.token or os.environ.get("GRAFANA_TOKEN")
    result = push_dashboards(args.grafana_url, token, args.prometheus_url, timeout_s=args.timeout)
    for uid in result.dashboards:
        print(f"{result.url}/d/{uid}")
    return 0


def cmd_monitor_up(args: argparse.Namespace) -> int:
    """``testbed monitor up``: start Prometheus on the given targets, in the foreground or detached."""
    from deploy.monitoring import LocalPrometheus, monitor_up, prometheus_config

    if args.foreground:
        config = prometheus_config(args.url, args.scrape_interval)
        with LocalPrometheus(config, port=args.port, binary=args.prometheus_bin) as prom:
            print(f"prometheus: {prom.url}  (scraping {', '.join(args.url)}; Ctrl-C stops it)", flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
        return 0
    state = monitor_up(
        args.url, Path(args.state_dir), port=args.port, scrape_interval=args.scrape_interval,
        binary=args.prometheus_bin, ray=not args.no_ray,
    )
    print(f"prometheus: {state.url}  (pid {state.pid}, scraping {', '.join(state.targets)})")
    print(f"graph:      {state.url}/graph?g0.expr=llm_energy_energy_per_token_joules&g0.range_input=15m")
    print(f"stop it:    testbed monitor down --state-dir {args.state_dir}")
    return 0


def cmd_monitor_down(args: argparse.Namespace) -> int:
    """``testbed monitor down``: stop the Prometheus that ``monitor up`` started."""
    from deploy.monitoring import monitor_down

    state = monitor_down(Path(args.state_dir))
    print(f"stopped prometheus (pid {state.pid})")
    return 0


def add_ops_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``dashboards`` and ``monitor`` subcommands to the ``testbed`` parser."""
    dash = sub.add_parser("dashboards", help="Grafana dashboards").add_subparsers(
        dest="action", required=True
    )
    exp = dash.add_parser("export", help="write the dashboards as JSON (one <uid>.json each)")
    exp.add_argument("dir", help="output folder, e.g. helm/llm-energy-testbed/dashboards")
    exp.set_defaults(func=cmd_dashboards_export)
    prov = dash.add_parser("provision", help="write Grafana provisioning files (datasource + dashboards)")
    prov.add_argument("out", help="output folder")
    prov.add_argument("--prometheus-url", default="http://127.0.0.1:9090")
    prov.set_defaults(func=cmd_dashboards_provision)
    push = dash.add_parser("push", help="create the datasource and dashboards on a Grafana server")
    push.add_argument("--grafana-url", required=True, help="e.g. http://127.0.0.1:3000")
    push.add_argument("--token", help="service account token (default: $GRAFANA_TOKEN)")
    push.add_argument(
        "--prometheus-url", default="http://127.0.0.1:9090", help="as Grafana's server reaches it"
    )
    push.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    push.set_defaults(func=cmd_dashboards_push)

    mon = sub.add_parser("monitor", help="local Prometheus scraping a testbed").add_subparsers(
        dest="action", required=True
    )
    up = mon.add_parser("up", help="start Prometheus on 127.0.0.1 scraping URL/metrics (and Ray's metrics)")
    up.add_argument("--url", action="append", required=True, help="testbed URL; repeat for several")
    up.add_argument("--port", type=int, default=9090, help="Prometheus port (0 picks a free one)")
    up.add_argument("--scrape-interval", default="5s")
    up.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="where the PID, config and TSDB live")
    up.add_argument("--prometheus-bin", help="Prometheus binary (default: `prometheus` on PATH)")
    up.add_argument("--no-ray", action="store_true", help="do not scrape Ray's metrics discovery file")
    up.add_argument("--foreground", action="store_true", help="run until Ctrl-C with a temporary TSDB")
    up.set_defaults(func=cmd_monitor_up)
    down = mon.add_parser("down", help="stop the Prometheus started by `monitor up`")
    down.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    down.set_defaults(func=cmd_monitor_down)
