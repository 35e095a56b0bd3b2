"""`deepserve status`: services (with live health), pods and instances, read from etcd."""

from __future__ import annotations

import asyncio
import time

from deepserve import records
from deepserve.rpc.health_check import check_health
from deepserve.store.etcd import EtcdStore


def _age(since: float) -> str:
    seconds = max(0, int(time.time() - since))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


async def print_status(etcd_endpoint: str) -> int:
    async with EtcdStore(etcd_endpoint) as etcd:
        await etcd.connect(wait_s=3)
        services, _ = await records.services(etcd).list()
        pods, _ = await records.pods(etcd).list()
        instances, _ = await records.instances(etcd).list()
    health = await asyncio.gather(*(check_health(s.record.address) for s in services))
    print(f"etcd {etcd_endpoint}")
    print(f"\nSERVICES ({len(services)})")
    for svc, state in sorted(zip(services, health, strict=True), key=lambda p: p[0].record.service):
        r = svc.record
        extra = f"  http {r.http_address}" if r.http_address else ""
        extra += f"  metrics {r.metrics_address}" if r.metrics_address else ""
        print(
            f"  {r.service:<10} {state:<12} {r.address:<21} pid {r.pid:<7} up {_age(r.started_at)}{extra}"
        )
    print(f"\nPODS ({len(pods)})")
    for pod in pods:
        p = pod.record
        model = f"  {p.model} ({p.role.value})" if p.model else ""
        print(f"  {p.pod_id:<24} {p.state.value:<9} {p.address:<21} pid {p.pid}{model}")
    print(f"\nINSTANCES ({len(instances)})")
    for inst in instances:
        i = inst.record
        print(f"  {i.instance_id:<24} {i.model:<20} {i.role.value:<10} {i.address} on {i.pod_id}")
    return 0 if all(h == "SERVING" for h in health) else 2
