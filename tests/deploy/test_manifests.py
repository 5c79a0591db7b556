"""Checks of the deployment artefacts: Dockerfile, deploy/k8s manifests, Grafana dashboard.

The linters (kubernetes-validate, checkov, hadolint, promql-parser) live in their own
virtual environment, .venv-deploy, so that checkov's dependencies never meet the server's
pins; these tests call them there by path and fail, not skip, when it is missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "tapserve.json"
DOCKERFILE = ROOT / "Dockerfile"
CHECKOV_CONFIG = ROOT / "deploy" / ".checkov.yaml"
DEPLOY_BIN = ROOT / ".venv-deploy" / "bin"
SETUP = (
    "python3 -m venv .venv-deploy && .venv-deploy/bin/pip install -r deploy/requirements-lint.txt"
)

# The oldest Kubernetes the manifests target (native gRPC probes are GA since 1.27, the
# preStop `sleep` action is on by default since 1.30) and the newest the pinned
# kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# Kinds that are not part of Kubernetes itself, so kubernetes-validate has no schema for
# them: it warns and passes. Rather than pull a third-party CRD schema of some version
# into the repository, test_custom_resources checks their structure below, field by field,
# against the resources they refer to.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}

# Files of deploy/k8s that kustomization.yaml deliberately leaves out (its header says why).
NOT_IN_KUSTOMIZATION = {"deployment-gpu.yaml", "prometheus-adapter-rules.yaml",
                        "certificate.yaml"}

DEPLOYMENTS = ("deployment.yaml", "deployment-gpu.yaml")

# The metric names the server exports (see docs/operations.md's metrics table).
COUNTERS = {"tapserve_requests_total", "tapserve_grpc_requests_total",
            "tapserve_model_load_failures_total", "tapserve_deduplicated_rows_total"}
HISTOGRAMS = {
    "tapserve_request_duration_seconds",
    "tapserve_queue_duration_seconds",
    "tapserve_compute_duration_seconds",
    "tapserve_explain_compute_duration_seconds",
    "tapserve_request_stage_seconds",
    "tapserve_batch_size",
}
GAUGES = {
    "tapserve_queue_depth",
    "tapserve_model_ready",
    "tapserve_model_load_duration_seconds",
    "tapserve_gpu_memory_bytes",
}
# prometheus-client's process collector, on the server's own registry: no model labels.
PROCESS = {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"}
METRICS = (
    COUNTERS | GAUGES | PROCESS
    | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
# Which of them carry the `model` / `endpoint` labels the dashboard filters on.
WITHOUT_MODEL = {"tapserve_grpc_requests_total", "tapserve_gpu_memory_bytes"} | PROCESS
WITH_ENDPOINT = {
    "tapserve_requests_total",
    "tapserve_request_duration_seconds",
    "tapserve_queue_duration_seconds",
    "tapserve_explain_compute_duration_seconds",
}
SELECTOR = re.compile(r"\b((?:tapserve|process)_[a-z_]+)(\{[^}]*\})?")
# The labels a Kubernetes scrape adds; every dashboard selector filters on them, so two
# deployments on one Prometheus never merge.
SCOPE = ("namespace", "job", "pod")


# ---- helpers ---------------------------------------------------------------------------


def tool(name: str) -> Path:
    path = DEPLOY_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing. Set up the deploy linters at the repo root: {SETUP}")
    return path


def run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


def documents(name: str) -> list[dict[str, Any]]:
    with open(K8S / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def document(name: str) -> dict[str, Any]:
    (doc,) = documents(name)
    return doc


def manifest_files() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml"))


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per pod"
    return containers[0]


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def secret_volumes(deployment: dict[str, Any]) -> dict[str, str]:
    """mount path -> Secret name, for the container's Secret volumes."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
            for m in container(deployment)["volumeMounts"] if "secret" in volumes[m["name"]]}


def port(c: dict[str, Any], name: str) -> int:
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return p


def parse_promql(exprs: list[str]) -> list[str]:
    """Parse each expression with promql-parser (in .venv-deploy); return the errors."""
    script = (
        "import json, sys, promql_parser\n"
        "errors = []\n"
        "for e in json.load(sys.stdin):\n"
        "    try:\n"
        "        promql_parser.parse(e)\n"
        "    except Exception as exc:\n"
        "        errors.append(f'{e}: {exc}')\n"
        "print(json.dumps(errors))\n"
    )
    result = run(tool("python"), "-c", script, stdin=json.dumps(exprs))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---- Kubernetes schemas ----------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    files = manifest_files()
    result = run(tool("kubernetes-validate"), "--strict", "-k", version, *(K8S / f for f in files))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    problems = [line for line in lines if not line.startswith(("INFO", "WARN"))]
    assert not problems, out
    # A warning means "no schema for this kind": allowed only for the custom kinds, so a
    # misspelt apiVersion or kind of a built-in resource cannot slip through unvalidated.
    allowed = [f"kind {kind} with api version {api}" for api, kind in CUSTOM_KINDS]
    for line in lines:
        if line.startswith("WARN"):
            assert any(a in line for a in allowed), line
    builtin = sum(
        1 for f in files for d in documents(f) if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS
    )
    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
    assert len(passed) == builtin, out


def test_custom_resources() -> None:
    for f in manifest_files():
        for d in documents(f):
            assert {"apiVersion", "kind"} <= d.keys(), f
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"], f
                assert "namespace" not in d["metadata"], f"{f}: keep manifests namespace-agnostic"

    service = document("service.yaml")
    monitor = document("servicemonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == (
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
    )
    assert monitor["metadata"]["name"]
    assert set(monitor["spec"].keys()) <= {
        "selector",
        "endpoints",
        "namespaceSelector",
        "jobLabel",
        "targetLabels",
        "podTargetLabels",
    }
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert service_ports[endpoint["port"]]["port"] == 8002
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
        # The operator's `endpoint` target label would rename Tapserve's own `endpoint`
        # label to exported_endpoint, breaking the dashboard and the adapter rules.
        drops = [r for r in endpoint.get("relabelings", []) if r.get("action") == "labeldrop"]
        assert any(re.fullmatch(r["regex"], "endpoint") for r in drops)

    # cert-manager's Certificate makes the Secret both Deployments mount for TLS, for the
    # names the Services are dialled by.
    certificate = document("certificate.yaml")
    spec = certificate["spec"]
    assert set(spec) <= {"secretName", "duration", "renewBefore", "privateKey", "usages",
                         "dnsNames", "issuerRef", "commonName", "subject", "ipAddresses"}
    for name in DEPLOYMENTS:
        assert secret_volumes(document(name))["/etc/tapserve/tls"] == spec["secretName"]
    assert "server auth" in spec["usages"]
    names = {document(f)["metadata"]["name"] for f in ("service.yaml", "service-headless.yaml")}
    assert names <= set(spec["dnsNames"])
    assert spec["issuerRef"]["name"] and spec["issuerRef"]["kind"] in {"Issuer", "ClusterIssuer"}
    assert spec["privateKey"]["rotationPolicy"] == "Always"

    kustomization = document("kustomization.yaml")
    assert (kustomization["apiVersion"], kustomization["kind"]) == (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    )
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), name
    assert set(listed) | NOT_IN_KUSTOMIZATION == set(manifest_files()) - {"kustomization.yaml"}
    assert not set(listed) & NOT_IN_KUSTOMIZATION
    image_names = {container(document(d))["image"].split(":")[0] for d in DEPLOYMENTS}
    assert {i["name"] for i in kustomization.get("images", [])} <= image_names


# ---- linters ---------------------------------------------------------------------------


def checkov(*target: str) -> None:
    result = run(tool("checkov"), "--config-file", CHECKOV_CONFIG, *target)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    counts = re.findall(r"Passed checks: (\d+), Failed checks: (\d+)", out)
    assert counts, f"checkov scanned nothing:\n{out}"
    assert all(int(passed) > 0 and int(failed) == 0 for passed, failed in counts), out


def test_checkov_passes_on_manifests() -> None:
    checkov("-d", "deploy/k8s")


def test_checkov_passes_on_dockerfile() -> None:
    checkov("-f", "Dockerfile")


def test_checkov_skips_are_explained() -> None:
    config = yaml.safe_load(CHECKOV_CONFIG.read_text())
    skipped = config.get("skip-check", [])
    lines = CHECKOV_CONFIG.read_text().splitlines()
    for check in skipped:
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", check), f"skip by id only, not {check!r}"
        (at,) = [i for i, line in enumerate(lines) if line.strip() == f"- {check}"]
        assert lines[at - 1].strip().startswith("#"), f"{check} needs a reason comment"
        assert check in "\n".join(lines[:at]), f"the comment above {check} should name it"
    assert "skip-framework" not in config and "soft-fail" not in config


def test_hadolint_passes_on_dockerfile() -> None:
    result = run(tool("hadolint"), "--no-color", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_and_runs_tapserve() -> None:
    instructions = dockerfile_instructions()
    runs = [rest for word, rest in instructions if word == "RUN"]
    assert any(re.search(r"pip install [^&;]*(?<=\s)\.(\s|$)", r) for r in runs), runs
    assert ("ENTRYPOINT", '["tapserve"]') in instructions
    assert ("CMD", '["serve"]') in instructions
    assert ("EXPOSE", "8000 8001 8002") in instructions
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "tapserve" in pyproject["project"]["scripts"]

    bases = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert len(bases) >= 2, "multi-stage build"
    assert len(set(bases)) == 1, "same base in every stage (the venv's python symlinks)"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", bases[0]), bases[0]

    (user,) = [rest for word, rest in instructions if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, "numeric non-root UID"
    envs = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "TAPSERVE_MODEL_REPOSITORY=/models" in envs
    assert "HOME=/tmp" in envs

    # TensorFlow's version follows the project's pin: the Dockerfile swaps only the wheel's
    # name (tensorflow-cpu / tensorflow[and-cuda]) and names no version of its own.
    text = DOCKERFILE.read_text()
    assert not re.findall(r"tensorflow(?:-cpu|\[and-cuda\])?==[\d.]", text)
    assert '"tensorflow-cpu"' in text and '"tensorflow[and-cuda]"' in text
    assert "'tensorflow=='" in text and "pip install --no-cache-dir --no-deps ." in text
    # One backend per image, the server told which (TAPSERVE_BACKEND); TensorFlow by default.
    args = [rest for word, rest in instructions if word == "ARG"]
    assert args.count("BACKEND=tensorflow") == 2, "in both stages: the builder's and the ENV's"
    assert "TAPSERVE_BACKEND=$BACKEND" in envs
    assert "optional-dependencies" in text and "-c deploy/constraints-jax-cuda.txt" in text


def test_cuda_wheels_are_pinned_within_tensorflows_ranges() -> None:
    """deploy/constraints-cuda.txt pins every wheel tensorflow[and-cuda] asks for, each
    inside the range the installed tensorflow (the project's pin) allows."""
    pins = {}
    for line in (ROOT / "deploy" / "constraints-cuda.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    cuda = [Requirement(r) for r in importlib.metadata.requires("tensorflow") or []]
    cuda = [r for r in cuda if r.marker and r.marker.evaluate({"extra": "and-cuda"})
            and not r.marker.evaluate({"extra": ""})]
    assert len(cuda) >= 10, cuda
    for requirement in cuda:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned"
        assert requirement.specifier.contains(pins[name]), (requirement, pins[name])
    assert set(pins) == {canonicalize_name(r.name) for r in cuda}


def test_dockerignore_keeps_what_the_build_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            sources = rest.split()[:-1]
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
                assert (ROOT / source).exists() or source == "README.md", source


def test_dockerfile_matches_the_docs_install() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()  # "The container image"
    assert re.search(r"pip install (-e |--no-deps )?['\"]?\.(\[[\w,-]+\])?['\"]?", text), (
        "the docs install the project with `pip install .`, as the Dockerfile does"
    )
    assert "pip install --no-deps ." in text, "the docs say how the image installs it"
    assert "tapserve serve" in text


# ---- Deployments -----------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_drains_within_the_grace_period(name: str) -> None:
    deployment = document(name)
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    drain = int(env(c)["TAPSERVE_DRAIN_GRACE_SECONDS"])
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    # A liveness probe that could fail during the drain must not fail before it ends.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain + pre_stop


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_sets_no_tensorflow_threading(name: str) -> None:
    # The server sizes TensorFlow's thread pools itself (service/settings.py) and
    # overrides these: a TF_NUM_*_THREADS here would only mislead whoever reads it.
    names = [e["name"] for e in container(document(name)).get("env", [])]
    assert not [n for n in names if n.startswith("TF_NUM_")], names


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_probes_are_grpc_health_checks(name: str) -> None:
    c = container(document(name))
    assert port(c, "grpc") == int(env(c)["TAPSERVE_GRPC_PORT"]) == 8001
    # The kubelet's gRPC probe cannot do TLS: it asks the plaintext health port.
    health_port = port(c, "health")
    assert health_port == int(env(c)["TAPSERVE_HEALTH_PORT"]) == 8003
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c[probe]
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert spec["grpc"]["port"] == health_port, probe
        assert spec["grpc"].get("service", "") == "", probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, (
        "model load and warm-up get at least 5 minutes"
    )


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_is_locked_down(name: str) -> None:
    deployment = document(name)
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= c["resources"]["limits"].keys()

    image = c["image"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image

    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    models = volumes[mounts["/models"]["name"]]
    assert mounts["/models"]["readOnly"] is True
    assert models["persistentVolumeClaim"]["claimName"] == document("pvc.yaml")["metadata"]["name"]
    assert models["persistentVolumeClaim"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert env(c)["TAPSERVE_MODEL_REPOSITORY"] == "/models"

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port(c, "metrics")
    assert int(env(c)["TAPSERVE_METRICS_PORT"]) == port(c, "metrics") == 8002


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_mounts_the_tls_and_token_secrets(name: str) -> None:
    deployment = document(name)
    c = container(deployment)
    secrets = secret_volumes(deployment)
    assert set(secrets) == {"/etc/tapserve/tls", "/etc/tapserve/tokens"}
    variables = env(c)
    assert variables["TAPSERVE_TLS_CERT_FILE"] == "/etc/tapserve/tls/tls.crt"
    assert variables["TAPSERVE_TLS_KEY_FILE"] == "/etc/tapserve/tls/tls.key"
    assert variables["TAPSERVE_AUTH_TOKEN_FILE"].startswith("/etc/tapserve/tokens/")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for path in secrets:
        # Whole folders: files under a subPath mount never see a Secret's update.
        assert mounts[path]["readOnly"] is True and "subPath" not in mounts[path]
        secret = volumes[mounts[path]["name"]]["secret"]
        assert secret["optional"] is True and secret["defaultMode"] & 0o007 == 0
    # The health port is for the kubelet only: no Service exposes it.
    for f in ("service.yaml", "service-headless.yaml"):
        assert port(c, "health") not in {p["port"] for p in document(f)["spec"]["ports"]}
    policy = document("networkpolicy.yaml")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert {port(c, n) for n in ("http", "grpc", "metrics", "health")} <= allowed


def test_gpu_deployment_asks_for_a_gpu() -> None:
    deployment = document("deployment-gpu.yaml")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert c["image"].endswith("-gpu")
    assert document("deployment.yaml")["metadata"]["name"] == deployment["metadata"]["name"]


def test_service_pdb_and_hpa_point_at_the_deployment() -> None:
    deployment = document("deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    c = container(deployment)

    service = document("service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["grpc"]["port"] == port(c, "grpc")
    assert ports["metrics"]["port"] == port(c, "metrics")

    # Client-side round-robin: DNS lists the ready pods themselves, on the same gRPC port.
    headless = document("service-headless.yaml")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    (grpc_port,) = headless["spec"]["ports"]
    assert grpc_port["port"] == port(c, "grpc") and grpc_port["appProtocol"] == "grpc"
    assert grpc_port["targetPort"] == "grpc"
    assert headless["metadata"]["name"] != service["metadata"]["name"]

    pdb = document("pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = document("hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    hpa_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods"}
    assert hpa_metrics <= {rule["name"]["as"] for rule in adapter_rules()}


# ---- Prometheus adapter rules ------------------------------------------------------------


def adapter_rules() -> list[dict[str, Any]]:
    config = document("prometheus-adapter-rules.yaml")
    return yaml.safe_load(config["data"]["config.yaml"])["rules"]


def test_adapter_rules_are_valid_promql_on_tapserve_metrics() -> None:
    rules = adapter_rules()
    assert rules
    queries = []
    for rule in rules:
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        (series,) = SELECTOR.findall(rule["seriesQuery"])
        assert series[0] in METRICS, series
        assert re.fullmatch(rule["name"]["matches"], series[0])
        query = rule["metricsQuery"]
        for name, _ in SELECTOR.findall(query):
            assert name in METRICS, name
        # What the adapter substitutes for a per-pod query.
        queries.append(
            query.replace("<<.Series>>", series[0])
            .replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"a|b"')
            .replace("<<.GroupBy>>", "namespace, pod")
        )
        assert "<<" not in queries[-1], queries[-1]
    assert parse_promql(queries) == []


# ---- Grafana dashboard -------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def test_dashboard_has_its_template_variables() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in (*SCOPE, "model", "endpoint"):
        var = variables[name]
        assert var["type"] == "query"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert re.fullmatch(rf"label_values\((tapserve_[a-z_]+)(\{{.*\}})?, {name}\)", query)
        assert SELECTOR.match(query[len("label_values(") :]).group(1) in METRICS
        assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"
    # Each variable's choices follow the ones before it (namespace → job → pod → model).
    order = [v["name"] for v in board["templating"]["list"]]
    assert order[1:] == [*SCOPE, "model", "endpoint"], order
    for i, name in enumerate(order[2:], start=2):
        query = variables[name]["query"]["query"]
        for before in order[1:i]:
            if before != "endpoint":
                assert f'{before}=~"${before}"' in query, (name, query)


def test_dashboard_panels_query_only_tapserve_metrics() -> None:
    board = dashboard()
    ids = [p["id"] for p in board["panels"]] + [
        p["id"] for r in board["panels"] for p in r.get("panels", [])
    ]
    assert len(ids) == len(set(ids))
    exprs = []
    for panel in panels(board):
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no target"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in targets:
            expr = target["expr"]
            selectors = SELECTOR.findall(expr)
            assert selectors, f"{panel['title']!r}: {expr}"
            for name, matchers in selectors:
                assert name in METRICS, f"{panel['title']!r}: unknown metric {name}"
                for label in SCOPE:
                    assert f'{label}=~"${label}"' in matchers, f"{panel['title']!r}: {expr}"
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if name not in WITHOUT_MODEL:
                    assert 'model=~"$model"' in matchers, f"{panel['title']!r}: {expr}"
                if base in WITH_ENDPOINT:
                    assert 'endpoint=~"$endpoint"' in matchers, f"{panel['title']!r}: {expr}"
            exprs.append(expr)
    covered = {name for e in exprs for name, _ in SELECTOR.findall(e)}
    for needed in (
        "tapserve_requests_total",
        "tapserve_request_duration_seconds_bucket",
        "tapserve_queue_duration_seconds_bucket",
        "tapserve_compute_duration_seconds_bucket",
        "tapserve_request_stage_seconds_bucket",
        "tapserve_batch_size_sum",
        "tapserve_batch_size_count",
        "tapserve_queue_depth",
        "tapserve_model_ready",
        "tapserve_model_load_duration_seconds",
        "tapserve_model_load_failures_total",
        *PROCESS,
    ):
        assert needed in covered, f"no panel shows {needed}"
    # Grafana's variables replaced as Grafana would, then parsed as PromQL.
    concrete = [re.sub(r"\$\w+", ".*", e.replace("$__rate_interval", "5m")) for e in exprs]
    assert all("$" not in e for e in concrete), concrete
    assert parse_promql(concrete) == []


# ---- KServe ------------------------------------------------------------------------------

KSERVE = ROOT / "deploy" / "kserve"
# KServe's own CRD schemas, brought in as data (their SOURCE.md says from where).
KSERVE_SCHEMAS = ROOT / "tests" / "deploy" / "schemas" / "kserve-v0.20.0"
KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.json",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "clusterservingruntime.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.json",
}


def kserve_documents() -> dict[str, dict[str, Any]]:
    """file name -> its one document, for every file of deploy/kserve."""
    out = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        out[path.name] = doc
    return out


def kserve_errors(docs: list[dict[str, Any]]) -> list[str]:
    """Validate each custom resource against its KServe CRD schema, made strict, with the
    jsonschema package kubernetes-validate uses (in .venv-deploy); return the errors."""
    script = (
        "import json, sys, jsonschema\n"
        "def strict(s):\n"
        "    if isinstance(s, dict):\n"
        "        if ('properties' in s and 'additionalProperties' not in s\n"
        "                and not s.get('x-kubernetes-preserve-unknown-fields')):\n"
        "            s['additionalProperties'] = False\n"
        "        for v in s.values():\n"
        "            strict(v)\n"
        "    elif isinstance(s, list):\n"
        "        for v in s:\n"
        "            strict(v)\n"
        "    return s\n"
        "errors = []\n"
        "for schema_file, doc in json.load(sys.stdin):\n"
        "    schema = strict(json.load(open(schema_file)))\n"
        "    validator = jsonschema.validators.Draft202012Validator(schema)\n"
        "    for e in validator.iter_errors(doc):\n"
        "        errors.append(f\"{doc['kind']} {'/'.join(map(str, e.absolute_path))}: \"\n"
        "                      f\"{e.message[:300]}\")\n"
        "print(json.dumps(errors))\n"
    )
    pairs = [(str(KSERVE_SCHEMAS / KSERVE_KINDS[(d["apiVersion"], d["kind"])]), d)
             for d in docs]
    result = run(tool("python"), "-c", script, stdin=json.dumps(pairs))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_kserve_resources_validate_against_kserve_schemas() -> None:
    docs = kserve_documents()
    custom = [d for d in docs.values() if (d["apiVersion"], d["kind"]) in KSERVE_KINDS]
    assert {d["kind"] for d in custom} == {k for _, k in KSERVE_KINDS}
    assert kserve_errors(custom) == []
    # The schemas do refuse what KServe would: a misspelt field, a wrong type.
    runtime = json.loads(json.dumps(docs["servingruntime.yaml"]))
    runtime["spec"]["containers"][0]["argz"] = []
    runtime["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"
    errors = kserve_errors([runtime])
    assert len(errors) == 2 and any("argz" in e for e in errors), errors


def test_kserve_core_resources_validate_against_kubernetes_schemas() -> None:
    core = [KSERVE / f for f, d in kserve_documents().items()
            if (d["apiVersion"], d["kind"]) not in KSERVE_KINDS]
    assert core
    result = run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], *core)
    assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr


def test_kserve_runtime_serves_what_kserve_expects() -> None:
    from service.cli import _parser
    from service.settings import Settings

    docs = kserve_documents()
    runtime, cluster = docs["servingruntime.yaml"], docs["clusterservingruntime.yaml"]
    assert runtime["spec"] == cluster["spec"], "one runtime, two scopes"
    spec = runtime["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"keras", "tensorflow"}
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"  # the name KServe merges an InferenceService into
    assert c["image"] == container(document("deployment.yaml"))["image"]
    # The args are a valid `tapserve serve` command line, on KServe's ports and folder.
    assert c["args"][0] == "serve"
    args = vars(_parser().parse_args(c["args"]))
    settings = Settings(**{k: v for k, v in args.items() if k != "command" and v is not None})
    assert settings.model_repository == Path("/mnt/models")  # the storage initializer's
    assert (settings.http_port, settings.grpc_port) == (8080, 9000)
    assert settings.model_control_mode == "none"
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(settings.metrics_port)
    assert "ports" not in c, "Knative routes one port: the InferenceService names it"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == settings.http_port
        assert c[probe]["httpGet"]["path"].startswith("/v2/health/")
    # The same lock-down as deploy/k8s, and a writable /tmp for TensorFlow beside it.
    assert c["securityContext"] == container(document("deployment.yaml"))["securityContext"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "inferenceservice-grpc.yaml"])
def test_kserve_inference_service_uses_the_runtime_and_s3(name: str) -> None:
    docs = kserve_documents()
    predictor = docs[name]["spec"]["predictor"]
    model = predictor["model"]
    runtime = docs["servingruntime.yaml"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith("s3://")
    account = docs["serviceaccount.yaml"]
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] > predictor["minReplicas"]
    pod = document("deployment.yaml")["spec"]["template"]["spec"]["securityContext"]
    assert predictor["securityContext"] == pod
    if model["protocolVersion"] == "grpc-v2":  # Knative routes the gRPC port, as h2c
        (port,) = model["ports"]
        assert (port["name"], port["containerPort"]) == ("h2c", 9000)
