"""The Helm chart, validated without a cluster.

``helm lint --strict`` and ``helm template`` (helm from scripts/install-helm.sh), every rendered core object
through ``kubernetes-validate --strict``; the CRD objects (RayCluster, ServiceMonitor, PrometheusRule) have no
schema there, so they are checked against the minimal schemas vendored in tests/schemas/ and the RayCluster
pod templates go through kubernetes-validate as core PodTemplates. Alert rules: ``promtool check rules`` and
``promtool test rules`` (promtool from the Debian ``prometheus`` package).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "llm-energy-testbed"
EXAMPLES = sorted((ROOT / "helm" / "examples").glob("*.yaml"))
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.35.0"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster.ray.io_v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com_v1.json",
}
PROM_OPERATOR = ["--api-versions", "monitoring.coreos.com/v1"]


def _helm() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        pytest.skip("helm is not installed: run scripts/install-helm.sh (extracts it into .tools/bin)")
    return found


def _kubernetes_validate() -> list[str]:
    pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed: pip install -e '.[deploy]'"
    )
    return [sys.executable, "-m", "kubernetes_validate"]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([_helm(), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "rel", str(CHART), "--namespace", "llm", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the chart renders, by a readable name."""
    specs = {}
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            specs[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]["spec"]
        elif d["kind"] == "RayCluster":
            specs["RayCluster/head"] = d["spec"]["headGroupSpec"]["template"]["spec"]
            for g in d["spec"]["workerGroupSpecs"]:
                specs[f"RayCluster/{g['groupName']}"] = g["template"]["spec"]
    return specs


VALUES = [pytest.param([], id="defaults")] + [pytest.param(["-f", str(p)], id=p.stem) for p in EXAMPLES]
# helm lint has no --api-versions: the operator variant is rendered (template), not linted.
VARIANTS = [*VALUES, pytest.param(PROM_OPERATOR, id="defaults+prometheus-operator")]


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 2, "helm/examples/ should hold example values files"


def test_chart_ray_version_is_the_images() -> None:
    """KubeRay is told the image's Ray version, and the front door's Ray client must equal the cluster's."""
    import re

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    image = re.search(r"^ARG RAY_VERSION=(\S+)$", (ROOT / "deploy" / "Dockerfile").read_text(), re.M)
    assert image and values["serving"]["rayVersion"] == image.group(1)
    assert '"ray[client]==${RAY_VERSION}"' in (ROOT / "deploy" / "Dockerfile").read_text()


def test_node_ports_are_the_cli_defaults_and_clear_of_dcgm_exporter() -> None:
    """The meter, the node agent and dcgm-exporter (9400) share GPU nodes: each default port is its own, the chart's
    the CLI's, so a DaemonSet on hostNetwork or a bare-metal node does not fail to bind."""
    from controllers import NODE_AGENT_PORT
    from profilers.node_meter import DEFAULT_PORT as METER_PORT

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["meter"]["port"] == METER_PORT and values["nodeAgent"]["port"] == NODE_AGENT_PORT
    assert len({METER_PORT, NODE_AGENT_PORT, 9400}) == 3


@pytest.mark.parametrize("args", VALUES)
def test_lint_strict(args: list[str]) -> None:
    helm("lint", "--strict", "--kube-version", K8S_VERSION, str(CHART), *args)


@pytest.mark.parametrize("args", VARIANTS)
def test_rendered_objects_validate(args: list[str], tmp_path: Path) -> None:
    import jsonschema

    docs = render(*args)
    core, crds = [], []
    for d in docs:
        (crds if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS else core).append(d)
    # The CRDs' pod templates are core objects too: validate them strictly as PodTemplates.
    for d in by_kind(crds, "RayCluster"):
        groups = [("head", d["spec"]["headGroupSpec"])] + [
            (g["groupName"], g) for g in d["spec"]["workerGroupSpecs"]
        ]
        core += [
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"raycluster-{name}"},
                "template": g["template"],
            }
            for name, g in groups
        ]
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    proc = subprocess.run(
        [*_kubernetes_validate(), "--strict", "-k", K8S_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Couldn't find schema" not in proc.stdout + proc.stderr, "a core object had no schema"
    assert proc.stdout.count("passed for resource") == len(core)
    for d in crds:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[(d["apiVersion"], d["kind"])]).read_text())
        jsonschema.validate(d, schema)
    assert by_kind(crds, "RayCluster"), "the replicas' RayCluster was not rendered"


def test_kubernetes_validate_rejects_a_broken_object(tmp_path: Path) -> None:
    """The validation step itself can fail: an unknown field in a Deployment is reported under --strict."""
    deployment = next(d for d in render() if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["cmd"] = ["oops"]
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    proc = subprocess.run(
        [*_kubernetes_validate(), "--strict", "-k", K8S_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "cmd" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "serving.replicas=-1"], "at '/serving/replicas': minimum: got -1, want 1"),
        (["--set", "model.source.pvcClaimName="], "at '/model/source': 'oneOf' failed"),
        (["--set", "model.source.hostPath=/data/models"], "at '/model/source': 'oneOf' failed"),
        (["--set", "controller.policy=fastest"], "at '/controller/policy': value must be one of"),
        (["--set-json", "site.pue=0.5"], "at '/site/pue': minimum: got 0.5, want 1"),
        (["--set-json", "slo.attainmentTarget=1.5"], "at '/slo/attainmentTarget': maximum: got 1.5, want 1"),
        (["--set", "engine.maxModelLen=oops"], "at '/engine/maxModelLen'"),
        (["--set", "serving.replica=3"], "additional properties 'replica' not allowed"),
    ],
    ids=[
        "negative-replicas",
        "no-model-source",
        "two-model-sources",
        "unknown-policy",
        "pue-below-1",
        "attainment-over-1",
        "non-integer",
        "typo-key",
    ],
)
def test_schema_rejects_bad_values(args: list[str], message: str) -> None:
    for cmd in (["template", "rel", str(CHART)], ["lint", "--strict", str(CHART)]):
        proc = helm(*cmd, *args, check=False)
        assert proc.returncode != 0, f"helm {cmd[0]} accepted {args}"
        assert message in proc.stdout + proc.stderr


@pytest.mark.parametrize("args", VARIANTS)
def test_serving_config_matches_the_cli_schema(args: list[str]) -> None:
    """The ConfigMap `testbed serve` reads parses as ServingConfig, its site file as a SiteProfile and the
    controller file as the remote controller's config, comparing the p99 the chart's SLO values name."""
    from controllers.remote import RemoteControllerConfig
    from profilers.footprint import SiteProfile
    from serving.config import ServingConfig

    docs = render(*args)
    cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
    config = ServingConfig.model_validate(yaml.safe_load(cm["data"]["serving.yaml"]))
    site = SiteProfile.model_validate(yaml.safe_load(cm["data"]["site.yaml"]))
    assert RemoteControllerConfig.model_validate(yaml.safe_load(cm["data"]["controller.yaml"])).slo.percentile == 99
    assert config.site == "/etc/testbed/site.yaml"
    assert config.ray_address and config.ray_address.startswith("ray://")
    assert config.engine.model == "/models" or config.engine.model.startswith("/models/")
    front = next(
        d
        for d in by_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "front-door"
    )
    container = front["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["testbed", "serve", "/etc/testbed/serving.yaml"]
    assert site.pue >= 1.0


def test_example_values_reach_the_rendered_config() -> None:
    docs = render("-f", str(ROOT / "helm" / "examples" / "single-node-hostpath.yaml"))
    cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
    config = yaml.safe_load(cm["data"]["serving.yaml"])
    assert config["replicas"] == 1 and config["router"] == "round_robin"
    assert config["engine"]["clock_mhz"] == 1410
    assert yaml.safe_load(cm["data"]["site.yaml"])["cif_kg_per_kwh"] == 0.82
    volumes = pod_specs(docs)["RayCluster/gpu"]["volumes"]
    assert {"name": "model", "hostPath": {"path": "/data/models", "type": "Directory"}} in volumes


def test_vllm_values_render_a_real_engine_config_with_a_gpu_per_replica() -> None:
    from serving.config import ServingConfig, VLLMEngineConfig

    def serving_yaml(*args: str) -> dict[str, Any]:
        docs = render(*args)
        cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
        return yaml.safe_load(cm["data"]["serving.yaml"])

    data = serving_yaml("-f", str(ROOT / "helm" / "examples" / "vllm-gpu.yaml"))
    config = ServingConfig.model_validate(data)
    assert isinstance(config.engine, VLLMEngineConfig)
    assert config.engine.model == "/models" and config.engine.dtype == "bfloat16"
    assert config.engine.kv_cache_memory_bytes is None  # vLLM's share of the GPU, not the CPU default
    assert not config.engine.enforce_eager and config.engine.executor == "uni"
    assert config.num_gpus_per_replica == 1 and "device" not in data["engine"]
    # Large integers survive Helm's float reading; the emulated engine gets none of the vLLM keys.
    big = serving_yaml("--set", "engine.kind=vllm", "--set", "engine.vllm.kvCacheMemoryBytes=17179869184")
    assert big["engine"]["kv_cache_memory_bytes"] == 17179869184
    no_prefix = serving_yaml("--set", "engine.kind=vllm", "--set", "engine.vllm.enablePrefixCaching=false")
    assert no_prefix["engine"]["enable_prefix_caching"] is False
    assert "enable_prefix_caching" not in big["engine"]  # unset: vLLM's own default
    default = serving_yaml()
    assert "executor" not in default["engine"] and "num_gpus_per_replica" not in default
    assert ServingConfig.model_validate(default).engine.kind == "emulated"
    bad = helm("lint", "--strict", str(CHART), "--set", "engine.vllm.executor=ray", check=False)
    assert bad.returncode != 0 and "executor" in bad.stdout + bad.stderr


@pytest.mark.parametrize("args", VARIANTS)
def test_only_the_node_agent_is_privileged(args: list[str]) -> None:
    specs = pod_specs(render(*args))
    for name, spec in specs.items():
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if "node-agent" in name:
                assert sc.get("privileged") is True
                continue
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert sc.get("privileged") is not True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name


def test_gpu_workers_request_gpus_and_mount_the_model_read_only() -> None:
    docs = render("-f", str(ROOT / "helm" / "examples" / "gpu-cluster.yaml"))
    worker = pod_specs(docs)["RayCluster/gpu"]
    res = worker["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    mount = next(m for m in worker["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True and mount["mountPath"] == "/models"
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "llm-models", "readOnly": True},
    } in worker["volumes"]
    head = next(d for d in docs if d["kind"] == "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must not host replicas"


def test_service_monitor_only_with_the_crd() -> None:
    plain = render()
    assert not by_kind(plain, "ServiceMonitor") and not by_kind(plain, "PrometheusRule")
    service = next(d for d in by_kind(plain, "Service"))
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert any(d["metadata"]["name"].endswith("-alert-rules") for d in by_kind(plain, "ConfigMap"))

    operator = render(*PROM_OPERATOR)
    assert len(by_kind(operator, "ServiceMonitor")) == 1 and len(by_kind(operator, "PrometheusRule")) == 1
    assert "annotations" not in next(d for d in by_kind(operator, "Service"))["metadata"]
    forced_off = render(*PROM_OPERATOR, "--set", "metrics.serviceMonitor.enabled=false")
    assert not by_kind(forced_off, "ServiceMonitor")


def test_control_api_and_node_agent_are_fenced_by_network_policies() -> None:
    docs = render("-f", str(ROOT / "helm" / "examples" / "gpu-cluster.yaml"))
    policies = {d["metadata"]["name"]: d["spec"] for d in by_kind(docs, "NetworkPolicy")}
    ctl = policies["rel-llm-energy-testbed-controller"]
    assert ctl["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"llm-energy-testbed/control-client": "true"}}}
    ]
    agent = policies["rel-llm-energy-testbed-node-agent"]
    assert (
        agent["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "controller"
    )
    daemonset = by_kind(docs, "DaemonSet")[0]
    env = daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
    token = next(e for e in env if e["name"] == "TESTBED_NODE_AGENT_TOKEN")
    secret = by_kind(docs, "Secret")[0]
    assert token["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_dashboards_are_sidecar_configmaps() -> None:
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert len(files) >= 4
    maps = [
        d for d in by_kind(render(), "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard")
    ]
    assert sorted(k for d in maps for k in d["data"]) == files
    for d in maps:
        assert d["metadata"]["labels"]["grafana_dashboard"] == "1"
        for text in d["data"].values():
            assert json.loads(text)["uid"]


def test_notes_say_how_to_reach_the_front_door() -> None:
    out = helm("install", "rel", str(CHART), "--dry-run=client", "--namespace", "llm").stdout
    assert "kubectl -n llm port-forward svc/rel-llm-energy-testbed 8000:8000" in out
    assert "grafana_dashboard" in out


def _promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed: apt-get install --no-install-recommends prometheus")
    return found


def test_alert_rules_check_and_unit_tests(tmp_path: Path) -> None:
    promtool = _promtool()
    rules_cm = next(
        d for d in by_kind(render(), "ConfigMap") if d["metadata"]["name"].endswith("-alert-rules")
    )
    (tmp_path / "alerts.yaml").write_text(rules_cm["data"]["alerts.yaml"])
    shutil.copy(Path(__file__).parent / "promtool" / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # The PrometheusRule object carries the very same groups.
    rule = by_kind(render(*PROM_OPERATOR), "PrometheusRule")[0]
    assert rule["spec"]["groups"] == yaml.safe_load(rules_cm["data"]["alerts.yaml"])["groups"]


# Commands of components whose CLI lands with the controller work; until then they must not parse.
PENDING_COMMANDS: set[tuple[str, ...]] = set()


def test_container_commands_are_real_cli_commands() -> None:
    from deploy.cli import build_parser

    docs = render("-f", str(ROOT / "helm" / "examples" / "gpu-cluster.yaml"))
    commands = [
        c["command"] for spec in pod_specs(docs).values() for c in spec["containers"] if "command" in c
    ]
    assert ["testbed", "serve", "/etc/testbed/serving.yaml"] in commands
    pending_seen = set()
    for cmd in commands:
        assert cmd[0] == "testbed", cmd
        pending = next((p for p in PENDING_COMMANDS if tuple(cmd[1 : 1 + len(p)]) == p), None)
        if pending is None:
            build_parser().parse_args(cmd[1:])  # exits (SystemExit) on an unknown command or option
            continue
        pending_seen.add(pending)
        with pytest.raises(SystemExit):  # when this starts parsing, drop it from PENDING_COMMANDS
            build_parser().parse_args(cmd[1:])
    assert pending_seen == PENDING_COMMANDS


@pytest.mark.parametrize("args", VALUES)
def test_every_ray_process_uses_token_authentication(args: list[str]) -> None:
    """Ray's ports listen on every interface of their pods: each Ray process of the release presents the token."""
    docs = render(*args)
    specs = pod_specs(docs)
    ray_pods = [n for n in specs if n.startswith("RayCluster/") or n == "Deployment/rel-llm-energy-testbed"]
    assert len(ray_pods) >= 3, specs.keys()
    (secret,) = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-ray-auth")]
    for name in ray_pods:
        env = {e["name"]: e for e in specs[name]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "token"}, name
    mine = render(*args, "--set", "serving.rayAuth.existingSecret=ops-ray-token")
    assert not [d for d in by_kind(mine, "Secret") if d["metadata"]["name"].endswith("-ray-auth")]
    env = {e["name"]: e for e in pod_specs(mine)["RayCluster/head"]["containers"][0]["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ops-ray-token"


def test_meter_daemonset_runs_testbed_meter_unprivileged_and_is_scraped() -> None:
    assert not [d for d in render() if d["metadata"]["name"].endswith("-meter")]  # off by default
    docs = render("--set", "meter.enabled=true", "--set-string", "meter.extraArgs={--idle-w,40}")
    ds = next(d for d in by_kind(docs, "DaemonSet") if d["metadata"]["name"] == "rel-llm-energy-testbed-meter")
    spec = ds["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["command"][:2] == ["testbed", "meter"] and c["command"][-2:] == ["--idle-w", "40"]
    assert "--host" in c["command"] and "$(NODE_NAME)" in c["command"] and spec["hostPID"] is True
    assert c["securityContext"].get("privileged") is not True and spec["securityContext"]["runAsNonRoot"] is True
    service = next(d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "rel-llm-energy-testbed-meter")
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9402"
    operator = render(*PROM_OPERATOR, "--set", "meter.enabled=true")
    assert sorted(m["metadata"]["name"] for m in by_kind(operator, "ServiceMonitor")) == [
        "rel-llm-energy-testbed", "rel-llm-energy-testbed-meter"]
    bad = helm("lint", "--strict", str(CHART), "--set", "meter.enabled=true", "--set", "meter.port=0", check=False)
    assert bad.returncode != 0
