"""The Grafana dashboard and the HPA adapter rules against real data: a real Prometheus
(Debian's `prometheus`, which scripts/test.sh installs) scrapes a real Tapserve under load,
then every panel query is evaluated through Prometheus' HTTP API. A query that returns
nothing, or nonsense, fails the test.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from itertools import cycle
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
import zoo
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "tapserve.json"
ADAPTER_RULES = ROOT / "deploy" / "k8s" / "prometheus-adapter-rules.yaml"
PROMETHEUS = Path("/usr/bin/prometheus")

MODEL = "autoencoder"
MAX_BATCH = zoo.CONFIGS[MODEL]["batching"]["max_batch_size"]
EXPLAIN = "cam"  # an explain endpoint added to MODEL's config
SCRAPE_S = 1
LOAD_S = 12  # ≥ 2 × the rate window below, so every window holds changing data
# The labels a Kubernetes scrape job adds, which the adapter rules and the dashboard's
# namespace/job/pod variables select on.
NAMESPACE, JOB, POD = "tapserve-test", "tapserve", "tapserve-0"

# Grafana's built-in interval variables, as it would fill them for a short time range
# ($__rate_interval is at least 4 × the scrape interval).
INTERVALS = {"__rate_interval": "10s", "__interval": "2s", "__range": "1m"}
# Template variable values: everything ("All", whose allValue is .*) and one deployment's
# model, each variable set to a value the scrape really has.
TEMPLATE_VARIABLES = ("namespace", "job", "pod", "model", "endpoint")
ALL = dict.fromkeys(TEMPLATE_VARIABLES, ".*")
SELECTIONS = {"All": ALL,
              f"{NAMESPACE}/{JOB}/{POD} model={MODEL}": {
                  **ALL, "namespace": NAMESPACE, "job": JOB, "pod": POD, "model": MODEL}}
# One variable set to a value no series has: a panel that still shows data ignores it.
NOTHING = {name: {**ALL, name: f"no-such-{name}"} for name in ("namespace", "job", "pod", "model")}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")

MAX_LATENCY_S = 60.0


# ---- Prometheus --------------------------------------------------------------------------



class Prometheus:
    """A Prometheus process on a free port, scraping `target` every SCRAPE_S seconds."""

    def __init__(self, workdir: Path, target: str) -> None:
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "scrape_configs": [{
                "job_name": JOB,
                "static_configs": [{"targets": [target],
                                    "labels": {"namespace": NAMESPACE, "pod": POD}}],
            }],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                stdout=log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry Prometheus' error as JSON
            return json.loads(exc.read())

    def query(self, expr: str) -> Any:
        return self.get("/api/v1/query", query=expr)

    def wait_scraping(self, timeout: float = 30) -> None:
        """Until the target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                targets = self.get("/api/v1/targets")["data"]["activeTargets"]
                last = [(t["health"], t["lastError"]) for t in targets]
                if targets and all(t["health"] == "up" for t in targets):
                    return
            except OSError as exc:  # not listening yet
                last = exc
            time.sleep(0.2)
        pytest.fail(f"Prometheus is not scraping Tapserve (last: {last!r}); its log:\n"
                    f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


# ---- Load --------------------------------------------------------------------------------


class Load:
    """Background threads sending requests to every endpoint, plus some that fail."""

    def __init__(self, server: Any, threads: int = 4) -> None:
        self.server = server
        self.stop_event = threading.Event()
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self.unexpected: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        calls = cycle([
            (MODEL, "image", (8, 8, 1), None),
            (f"{MODEL}.encoder", "image", (8, 8, 1), None),
            (f"{MODEL}.decoder", "code", (4,), None),
            (MODEL, "image", (8, 8, 1), None),
            (f"{MODEL}.{EXPLAIN}", "image", (8, 8, 1), None),  # an explanation
            (f"{MODEL}.encoder", "image", (8, 8, 1), ["no_such_output"]),  # NOT_FOUND
        ])
        while not self.stop_event.is_set():
            name, feed, shape, outputs = next(calls)
            rows = int(rng.integers(1, 4))
            feeds = {feed: rng.random((rows, *shape), dtype=np.float32)}
            if rows > 1 and rng.random() < 0.3:  # a repeated row: de-dup has work
                feeds[feed][-1] = feeds[feed][0]
            key = f"{name}{outputs or ''}"
            try:
                self.server.infer(name, feeds, outputs, timeout=10)
                key += " OK"
            except grpc.RpcError as exc:
                key += f" {exc.code().name}"
                if not outputs or exc.code() != grpc.StatusCode.NOT_FOUND:
                    self.unexpected.append(f"{key}: {exc.details()}")
            with self._lock:
                self.sent[key] = self.sent.get(key, 0) + 1
            time.sleep(0.005)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(15)


# ---- What to evaluate --------------------------------------------------------------------


def dashboard_queries() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every target of every panel, rows' nested panels included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            out.extend((panel, target) for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation: $name, ${name}, ${name:fmt} and [[name]]."""
    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in INTERVALS:
            return INTERVALS[name]
        if name in values:
            return values[name]
        return match.group(0)  # left as is: reported as unresolved
    return VARIABLE.sub(one, expr)


def adapter_queries() -> list[tuple[str, str, str]]:
    """(metric name, series query, metrics query) per adapter rule, templated the way
    prometheus-adapter does for a per-pod HPA metric."""
    config = yaml.safe_load(ADAPTER_RULES.read_text())
    out = []
    for rule in yaml.safe_load(config["data"]["config.yaml"])["rules"]:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
        fields = {"Series": series, "LabelMatchers": f'namespace="{NAMESPACE}",pod=~"{POD}"',
                  "GroupBy": "pod"}
        query = re.sub(r"<<\s*\.(\w+)\s*>>", lambda m, f=fields: f[m.group(1)],
                       rule["metricsQuery"])
        out.append((rule["name"]["as"], rule["seriesQuery"], query))
    return out


# ---- Sanity of one result ----------------------------------------------------------------


def problems(expr: str, unit: str | None, legend: str, result: dict[str, Any]) -> list[str]:
    """What is wrong with an instant query's answer (empty list: nothing). `unit` is the
    panel's Grafana unit: "s" values are latencies, "percentunit" values ratios."""
    if result.get("status") != "success":
        return [f"query failed: {result.get('errorType')}: {result.get('error')}"]
    data = result["data"]
    if data["resultType"] == "scalar":
        series = [{"metric": {}, "value": data["result"]}]
    elif data["resultType"] == "vector":
        series = data["result"]
    else:
        return [f"unexpected result type {data['resultType']}"]
    if not series:
        return ["no data"]
    # A query on tapserve_model_ready alone: the served model must be there, and ready.
    ready = set(re.findall(r"\btapserve_\w+", expr)) == {"tapserve_model_ready"}
    found = []
    values = []
    for s in series:
        labels = s["metric"]
        shown = "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
        value = float(s["value"][1])
        values.append(value)
        if not math.isfinite(value):
            found.append(f"{shown} = {value}: not a finite number")
            continue
        if value < 0:
            found.append(f"{shown} = {value}: negative")
        if unit == "s" and value >= MAX_LATENCY_S:
            found.append(f"{shown} = {value}: over {MAX_LATENCY_S}s")
        if unit == "percentunit" and not 0 <= value <= 1:
            found.append(f"{shown} = {value}: a ratio outside [0, 1]")
        if ("tapserve_batch_size" in expr and "increase(" not in expr
                and value > MAX_BATCH):
            found.append(f"{shown} = {value}: more rows per batch than max_batch_size "
                         f"{MAX_BATCH}")
        if ready and labels.get("model") == MODEL and value != 1:
            found.append(f"{shown} = {value}: model {MODEL!r} is served, ready must be 1")
    missing = {name for name in LEGEND_LABEL.findall(legend)
               for s in series if name not in s["metric"]}
    if missing:
        found.append(f"legend {legend!r} names labels some series lack: {sorted(missing)}")
    if ("rate(" in expr or "increase(" in expr) and not any(v > 0 for v in values):
        found.append("every series is 0, under load")
    if ready and not any(s["metric"].get("model") == MODEL for s in series):
        found.append(f"no series for the served model {MODEL!r}")
    return found


# ---- The test ----------------------------------------------------------------------------


@pytest.fixture
def prometheus(start_server: Any, tmp_path: Path) -> Iterator[tuple[Prometheus, Any]]:
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} is missing: run scripts/test.sh, which installs Debian's "
                    "`prometheus` package for this test")
    repository = tmp_path / "models"
    zoo.write_model(MODEL, repository)
    # An explain endpoint, so the explanation panel has batches to show: Grad-CAM of the
    # 4-wide code over the encoder's conv layer.
    config = yaml.safe_load((repository / MODEL / "config.yaml").read_text())
    config["endpoints"][EXPLAIN] = {"explain": "gradcam", "output": "code", "layer": "enc_conv"}
    (repository / MODEL / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # A broken neighbour, so the load-failure panel has a failure to show.
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "1" / "model.keras").write_bytes(b"not a model")
    server = start_server(repository, strict_readiness=False)
    target = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prom = Prometheus(workdir, target)
    try:
        prom.wait_scraping()
        yield prom, server
    finally:
        prom.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_every_dashboard_panel_and_adapter_rule_has_sane_data_under_load(
        prometheus: tuple[Prometheus, Any]) -> None:
    prom, server = prometheus
    gpus = [d for d in server.server.devices if d.startswith("/GPU")]
    queries = dashboard_queries()
    assert queries, f"no panel queries found in {DASHBOARD}"
    failures: list[str] = []

    with Load(server) as load:
        time.sleep(LOAD_S)
        # Evaluated while the load goes on: every rate window holds fresh increases.
        for (panel, target) in queries:
            expr = target["expr"]
            title = panel.get("title", f"panel {panel.get('id')}")
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
            for variable in TEMPLATE_VARIABLES:
                for m in re.finditer(rf'(\w+)\s*(=~|!~|=|!=)\s*"[^"]*\$\{{?{variable}\b', expr):
                    if m.group(2) not in ("=~", "!~"):
                        failures.append(f"{title!r}: ${variable} needs a regex matcher (=~), "
                                        f"its All and multi values are regexes: {expr}")
            for selection, values in SELECTIONS.items():
                concrete = substitute(expr, values)
                if VARIABLE.search(concrete):
                    failures.append(f"{title!r}: unresolved variable in {concrete}")
                    continue
                found = problems(concrete, unit, target.get("legendFormat", ""),
                                 prom.query(concrete))
                if "tapserve_gpu_memory_bytes" in expr and not gpus:
                    # Without a GPU the server exports no GPU series: this panel must be
                    # empty then, and is only checked for data where there is a GPU.
                    found = [] if found == ["no data"] else (found or ["data without a GPU"])
                failures.extend(f"{title!r} [{selection}]: {p}\n    query: {concrete}"
                                for p in found)
            for variable, values in NOTHING.items():
                if variable == "model" and "$model" not in expr:
                    continue  # gRPC calls, GPU memory, process: their metrics have no model
                concrete = substitute(expr, values)
                result = prom.query(concrete)
                if result.get("status") != "success" or result["data"]["result"]:
                    failures.append(f"{title!r} [{variable}={values[variable]}]: shows data "
                                    f"from other {variable}s: {result}\n    query: {concrete}")

        for name, series_query, query in adapter_queries():
            series = prom.get("/api/v1/series", **{"match[]": series_query})
            if not series.get("data"):
                failures.append(f"adapter rule {name}: seriesQuery matches nothing: "
                                f"{series_query}")
            unit = "s" if "seconds" in name else None
            found = problems(query, unit, "{{pod}}", prom.query(query))
            failures.extend(f"adapter rule {name}: {p}\n    query: {query}" for p in found)

    assert not load.unexpected, f"unexpected errors from the load: {load.unexpected[:5]}"
    assert any(k.endswith(" OK") for k in load.sent), f"no request succeeded: {load.sent}"
    assert not failures, (
        f"{len(failures)} dashboard/adapter queries without sane data "
        f"(load sent {load.sent}):\n" + "\n".join(failures))
