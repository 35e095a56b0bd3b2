"""One engine's PD hand-off parts: its prefill server, channels to prefill peers, shm pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from deepserve.flowserve.disagg.decode_client import (
    GrpcPrefillSource,
    PeerChannels,
    TransferStats,
)
from deepserve.flowserve.disagg.prefill_flow import PrefillServer
from deepserve.flowserve.disagg.prefill_service import serve_prefill
from deepserve.flowserve.transfer.landing import LandingPool
from deepserve.flowserve.transfer.settings import TransferSettings
from deepserve.flowserve.transfer.shared_memory import SharedMemoryPool
from deepserve.v1 import common_pb2, flowserve_pb2


class DisaggEndpoint:
    """Serves Prefill for this engine and builds prefill sources for its decode requests."""

    def __init__(self, engine: Any, settings: TransferSettings | None = None) -> None:
        self.settings = settings if settings is not None else TransferSettings()
        self.engine = engine
        self.prefill_server = PrefillServer(
            engine,
            max_chunk_bytes=self.settings.max_chunk_bytes,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
        )
        self.peers = PeerChannels()
        self.received = TransferStats()
        self.landing_pool = LandingPool(self.settings.tcp_landing_keep_bytes)
        self.shared_memory = SharedMemoryPool(
            self.settings.shared_memory_dir, self.settings.segment_ttl_s
        )

    def remote_source(
        self,
        prefill_address: str,
        prompt_token_ids: list[int],
        *,
        model: str,
        sampling: common_pb2.SamplingParams,
        mode: flowserve_pb2.KVTransferMode.ValueType = flowserve_pb2.KV_TRANSFER_MODE_UNSPECIFIED,
        cache_salt: str = "",
    ) -> GrpcPrefillSource:
        if mode == flowserve_pb2.KV_TRANSFER_MODE_UNSPECIFIED:
            layerwise = self.settings.transfer_mode == "layerwise"
        else:
            layerwise = mode == flowserve_pb2.KV_TRANSFER_MODE_LAYERWISE
        return GrpcPrefillSource(
            self.peers,
            prefill_address,
            prompt_token_ids,
            model=model,
            sampling=sampling,
            settings=self.settings,
            layerwise=layerwise,
            stats=self.received,
            cache_salt=cache_salt,
            landing_pool=self.landing_pool,
        )

    def prefill_stream(
        self, request: flowserve_pb2.PrefillRequest, params: Any
    ) -> AsyncIterator[flowserve_pb2.PrefillResponse]:
        return serve_prefill(
            self.prefill_server, request, params, self.settings, self.shared_memory
        )

    async def close(self) -> None:
        await self.peers.close()
