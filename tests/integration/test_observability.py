"""One request, one trace, and Prometheus metrics on every service. Starts real processes via
`deepserve up`: etcd, valkey-server, scheduler, jobmgr, podpool, gateway and flowserve pods
serving a tiny random Llama. The tests share the cluster; each sends the requests whose traces
or metrics it checks, so each passes alone and in any order."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deepserve import records
from deepserve.cli.trace_view import find_trace, read_spans
from deepserve.store.etcd import EtcdStore
from tests.cluster_harness import RunningCluster, local_cluster
from tests.tiny_model import make_tiny_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    model = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    with local_cluster(tmp_path_factory.mktemp("up"), model=str(model)) as running:
        running.model = str(model)  # type: ignore[attr-defined]
        yield running


def post_chat(cluster: RunningCluster, request_id: str) -> dict:
    body = json.dumps(
        {
            "model": cluster.model,  # type: ignore[attr-defined]
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 8,
            "temperature": 0,
        }
    ).encode()
    request = urllib.request.Request(
        f"{cluster.layout.gateway_url}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "x-request-id": request_id},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["x-request-id"] == request_id
        return json.loads(response.read())


def scrape(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


async def services(cluster: RunningCluster) -> list[records.ServiceRecord]:
    async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
        found, _ = await records.services(etcd).list()
    return [v.record for v in found]


async def test_one_request_is_one_trace_across_gateway_scheduler_and_flowserve(
    cluster: RunningCluster,
) -> None:
    reply = await asyncio.to_thread(post_chat, cluster, "trace-me-1")
    assert reply["usage"]["completion_tokens"] == 8
    telemetry = cluster.layout.telemetry_dir
    deadline = time.monotonic() + 15  # span processors flush every 0.5 s
    while True:
        try:
            spans = find_trace(read_spans(telemetry), "trace-me-1")
            names = {s["name"] for s in spans}
            ids = {s["span_id"] for s in spans}
            # Complete once every process has flushed: no span's parent is missing.
            dangling = [s for s in spans if s["parent_span_id"] and s["parent_span_id"] not in ids]
            if {"engine.decode", "route"} <= names and not dangling:
                break
        except Exception:
            spans = []
        assert time.monotonic() < deadline, f"incomplete trace: {sorted(s['name'] for s in spans)}"
        await asyncio.sleep(0.25)

    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent_span_id"] not in by_id]
    assert len(roots) == 1, [r["name"] for r in roots]
    assert roots[0]["name"] == "POST /v1/chat/completions"
    assert roots[0]["attributes"]["request_id"] == "trace-me-1"
    assert {s["service"] for s in spans} >= {
        "deepserve-gateway",
        "deepserve-scheduler",
        "deepserve-flowserve",
    }
    assert {"auth", "tokenize", "route", "engine.queue", "engine.prefill", "engine.decode"} <= {
        s["name"] for s in spans
    }

    def ancestors(span: dict) -> list[str]:
        chain = []
        while span["parent_span_id"] in by_id:
            span = by_id[span["parent_span_id"]]
            chain.append(span["name"])
        return chain

    route = next(s for s in spans if s["name"] == "route")
    assert route["attributes"]["route.branch"]
    assert "deepserve.v1.SchedulerService/Route" in ancestors(route)
    decode = next(s for s in spans if s["name"] == "engine.decode")
    assert decode["attributes"]["output_tokens"] == 8
    assert len(decode["events"]) >= 1
    assert "deepserve.v1.FlowServeService/Generate" in ancestors(decode)
    # Every child lies inside its parent's time window (clocks are the same host's).
    for span in spans:
        parent = by_id.get(span["parent_span_id"])
        if parent is not None and parent["service"] == span["service"]:
            assert parent["start_unix_ns"] <= span["start_unix_ns"] <= parent["end_unix_ns"]


async def test_every_service_serves_prometheus_metrics_and_ttft_counts_the_request(
    cluster: RunningCluster,
) -> None:
    gateway = next(s for s in await services(cluster) if s.service == "gateway")
    scheduler = next(s for s in await services(cluster) if s.service == "scheduler")
    before = await asyncio.to_thread(_ttft_count, cluster)
    requests_before = _chat_requests_ok(await asyncio.to_thread(scrape, gateway.metrics_address))
    decisions_before = _route_decisions(await asyncio.to_thread(scrape, scheduler.metrics_address))
    await asyncio.to_thread(post_chat, cluster, "metrics-1")
    seen = {s.service for s in await services(cluster)}
    assert seen >= {"gateway", "scheduler", "jobmgr", "podpool", "flowserve"}
    for service in await services(cluster):
        families = await asyncio.to_thread(scrape, service.metrics_address)
        assert "deepserve_rpc_requests" in families, service.service
    gw = await asyncio.to_thread(scrape, gateway.metrics_address)
    assert await asyncio.to_thread(_ttft_count, cluster) >= before + 1
    assert _chat_requests_ok(gw) >= requests_before + 1
    assert "deepserve_request_tpot_seconds" in gw and "deepserve_request_e2e_seconds" in gw
    decisions = _route_decisions(await asyncio.to_thread(scrape, scheduler.metrics_address))
    assert decisions >= decisions_before + 1
    engines = [s for s in await services(cluster) if s.service == "flowserve"]
    serving = []
    for engine in engines:
        families = await asyncio.to_thread(scrape, engine.metrics_address)
        if "deepserve_engine_kv_blocks_total" in families:
            serving.append(families)
    assert serving, "no flowserve instance reports engine gauges"
    ttft = serving[0]["deepserve_engine_ttft_seconds"]
    assert any(s.name.endswith("_count") and s.value >= 1 for s in ttft.samples)


def _chat_requests_ok(gateway_families: dict[str, Any]) -> float:
    """Chat completions the gateway answered 200 (0 before its first)."""
    family = gateway_families.get("deepserve_http_requests")
    if family is None:
        return 0.0
    return sum(
        s.value
        for s in family.samples
        if s.name.endswith("_total")
        and (s.labels["route"], s.labels["status"]) == ("/v1/chat/completions", "200")
    )


def _route_decisions(scheduler_families: dict[str, Any]) -> float:
    family = scheduler_families.get("deepserve_route_decisions")
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


def _ttft_count(cluster: RunningCluster) -> float:
    gateway_metrics = asyncio.run(_gateway_metrics_address(cluster))
    families = scrape(gateway_metrics)
    family = families.get("deepserve_request_ttft_seconds")
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples if s.name.endswith("_count"))


async def _gateway_metrics_address(cluster: RunningCluster) -> str:
    return next(s for s in await services(cluster) if s.service == "gateway").metrics_address


def test_dashboard_only_uses_metrics_the_services_export(cluster: RunningCluster) -> None:
    import re

    dashboard = json.loads(
        (
            Path(__file__).resolve().parents[2] / "deploy/grafana/deepserve-dashboard.json"
        ).read_text()
    )
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    # Labelled series (per model, route, branch) exist once a request has passed through.
    post_chat(cluster, "dashboard-1")
    used = set(re.findall(r"deepserve_[a-z_]+", exprs))
    exported: set[str] = set()
    for service in asyncio.run(services(cluster)):
        with urllib.request.urlopen(f"http://{service.metrics_address}/metrics", timeout=10) as r:
            exported |= set(re.findall(r"^(deepserve_[a-z_]+)", r.read().decode(), re.M))
    # Histograms and counters export suffixed series; the dashboard may use either form.
    missing = {
        name
        for name in used
        if not any(e == name or e.startswith(name) or name.startswith(e) for e in exported)
    }
    assert not missing, f"dashboard uses metrics nobody exports: {sorted(missing)}"


def test_a_scale_up_is_one_trace_with_a_span_per_step(cluster: RunningCluster) -> None:
    # `deepserve up` deployed the model: jobmgr -> podpool -> pod, one trace.
    deadline = time.monotonic() + 15
    while True:
        spans = list(read_spans(cluster.layout.telemetry_dir))
        roots = [s for s in spans if s["name"] == "scale_up"]
        trace = [s for s in spans if roots and s["trace_id"] == roots[0]["trace_id"]]
        steps = {s["name"] for s in trace if s["name"].startswith("scale_up.")}
        if len(steps) == 5:
            break
        assert time.monotonic() < deadline, f"scale-up trace incomplete: {sorted(steps)}"
        time.sleep(0.25)
    assert steps == {
        "scale_up.pod_acquired",
        "scale_up.engine_started",
        "scale_up.weights_loaded",
        "scale_up.warmed_up",
        "scale_up.visible",
    }
    by_name = {s["name"]: s for s in trace}
    assert by_name["scale_up"]["service"] == "deepserve-jobmgr"
    assert by_name["scale_up.pod_acquired"]["service"] == "deepserve-podpool"
    assert by_name["scale_up.visible"]["service"] == "deepserve-flowserve"
