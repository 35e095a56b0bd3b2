"""Entry point of the scheduler process: `python -m deepserve.scheduler` / `deepserve scheduler`."""

from __future__ import annotations

import asyncio
import os

from deepserve.errors import InvalidArgument
from deepserve.jobs.records import RoutingPolicy
from deepserve.runtime import ServiceRuntime
from deepserve.scheduler.decode_predictor import DecodeLengthPredictor
from deepserve.scheduler.heatmap_table import HeatmapTable
from deepserve.scheduler.history_sync import HistorySync
from deepserve.scheduler.instance_table import InstanceTable
from deepserve.scheduler.kv_event_feed import KVEventFeed
from deepserve.scheduler.load_tracker import LoadTracker
from deepserve.scheduler.policy_table import PolicyTable
from deepserve.scheduler.prefix_index import PrefixIndex
from deepserve.scheduler.router import Router, RoutingConfig
from deepserve.scheduler.servicer import SchedulerServicer
from deepserve.scheduler.settings import SchedulerSettings
from deepserve.scheduler.suspects import SuspectConfig, SuspectInstances
from deepserve.v1 import scheduler_pb2, scheduler_pb2_grpc

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


def default_policy(settings: SchedulerSettings) -> RoutingPolicy:
    try:
        return RoutingPolicy(settings.default_policy)
    except ValueError:
        raise InvalidArgument(
            f"unknown policy {settings.default_policy!r}", field="default_policy"
        ) from None


async def serve(settings: SchedulerSettings) -> None:
    async with ServiceRuntime("scheduler", settings, use_redis=True) as rt:
        assert rt.redis is not None
        table = InstanceTable(rt.etcd)

        def live_ids() -> list[str]:
            return [i.instance_id for i in table.all()]

        loads = LoadTracker(
            rt.redis,
            live_ids,
            refresh_s=settings.load_refresh_s,
            kv_weight=settings.kv_load_weight,
        )
        suspects = SuspectInstances(
            rt.redis,
            live_ids,
            lambda instance_id: loads.load_of(instance_id).report_at,
            reporter=f"scheduler-{os.getpid()}",
            config=SuspectConfig(
                clear_after_s=settings.suspect_clear_after_s, refresh_s=settings.load_refresh_s
            ),
        )
        index = PrefixIndex()
        feed = KVEventFeed(rt.redis, index, live_ids, block_ms=settings.kv_events_block_ms)
        predictor = DecodeLengthPredictor(
            settings.decode_bucket_tokens, settings.default_decode_tokens
        )
        history = HistorySync(rt.redis, predictor, refresh_s=settings.history_refresh_s)
        heatmaps = HeatmapTable(rt.etcd)
        policies = PolicyTable(rt.etcd, default_policy(settings))
        router = Router(
            table,
            loads,
            index,
            predictor,
            heatmaps,
            policies,
            RoutingConfig(
                balance_abs_threshold=settings.balance_abs_threshold,
                balance_rel_threshold=settings.balance_rel_threshold,
            ),
            suspects=suspects,
        )
        parts = (table, loads, suspects, feed, history, heatmaps, policies)
        for part in parts:
            part.start()
        servicer = SchedulerServicer(router, table, history, suspects)
        await rt.serve(
            [
                lambda server: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
            on_shutdown=[part.stop for part in reversed(parts)],
        )


def main() -> None:
    asyncio.run(serve(SchedulerSettings()))
