"""An in-process gateway (HTTP + gRPC) in front of an echo engine and a static scheduler, with
a real etcd and a real Redis-protocol server (the session fixtures). With `platform_apis`, the
gateway also serves the Files, Fine-tuning and Batch APIs, its job routes calling a real
jobmgr API (the servicer on a free port, over the same etcd and file store)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from deepserve import records
from deepserve.config import CommonSettings
from deepserve.gateway.gateway import Gateway
from deepserve.gateway.http_app import RouterFactory, create_app
from deepserve.gateway.http_server import HttpServer
from deepserve.gateway.platform_routes import file_service, platform_routers
from deepserve.gateway.servicer import GatewayServicer
from deepserve.gateway.settings import GatewaySettings
from deepserve.jobs.client import JobManagerClient
from deepserve.models.catalog import default_cache_dir
from deepserve.records import InstanceRecord, Role
from deepserve.rpc.server import start_grpc_server
from deepserve.store.etcd import EtcdStore
from deepserve.store.redis_store import RedisStore
from deepserve.tenancy.api_keys import ApiKeys, hash_api_key
from deepserve.tenancy.tenants import TenantLimits, Tenants
from deepserve.tokenizer import Tokenizer
from deepserve.v1 import common_pb2, gateway_pb2_grpc
from tests.unit.gateway.fake_engine import EchoEngine
from tests.unit.gateway.fake_scheduler import StaticScheduler
from tests.unit.jobmgr.api_server import jobmgr_api

MAX_MODEL_LEN = 512
# Tokens per KV block of the harness's engine, as its instance record says.
BLOCK_SIZE = 16


@dataclass
class GatewayHarness:
    """Handles on every part of the in-process stack."""

    gateway: Gateway
    engine: EchoEngine
    tokenizer: Tokenizer
    http_url: str
    grpc_address: str
    etcd: EtcdStore
    redis: RedisStore
    model: str
    instance_id: str
    scheduler: StaticScheduler

    async def new_key(self, limits: TenantLimits | None = None) -> tuple[str, str]:
        """A fresh tenant (with `limits`) and an API key for it, visible to the gateway."""
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        if limits is not None:
            await Tenants(self.etcd).set_limits(tenant, limits)
            assert await self.gateway.auth.tenants.wait_for(lambda items: tenant in items, 30)
        key, _ = await ApiKeys(self.etcd).create(tenant)
        digest = hash_api_key(key)
        assert await self.gateway.auth.keys.wait_for(lambda items: digest in items, 30)
        return tenant, key


@pytest.fixture(scope="session")
def smollm_tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(default_model_dir)


@contextlib.asynccontextmanager
async def running_harness(
    etcd_endpoint: str, redis_url: str, tokenizer: Tokenizer, *, platform_apis: bool = False
) -> AsyncIterator[GatewayHarness]:
    """Starts the whole in-process stack on the running event loop."""
    smollm_tokenizer = tokenizer
    etcd = EtcdStore(etcd_endpoint)
    await etcd.connect()
    redis = RedisStore(redis_url)
    await redis.connect()

    engine = EchoEngine(smollm_tokenizer)
    engine_address = await engine.start()

    scheduler = StaticScheduler()
    scheduler_address = await scheduler.start()

    files_root = Path(tempfile.mkdtemp(prefix="deepserve-files-"))
    settings = GatewaySettings(
        common=CommonSettings(
            etcd_endpoint=etcd_endpoint, redis_url=redis_url, files_root=files_root
        ),
        scheduler_address=scheduler_address,
        auth_open=False,
        request_timeout_s=30,
    )
    gateway = Gateway.build(settings, etcd, redis.client)
    model = f"echo-{uuid.uuid4().hex[:8]}"
    gateway.tokenizers.put(model, smollm_tokenizer)
    await gateway.start()

    instance_id = f"inst-{uuid.uuid4().hex[:8]}"
    await records.instances(etcd).put(
        instance_id,
        InstanceRecord(
            instance_id=instance_id,
            model=model,
            role=Role.COLOCATED,
            address=engine_address,
            pod_id="pod-echo",
            max_model_len=MAX_MODEL_LEN,
            block_size=BLOCK_SIZE,
        ),
    )
    assert await gateway.models.instances.wait_for(lambda items: instance_id in items, 30)
    scheduler.add(common_pb2.Instance(instance_id=instance_id, model=model, address=engine_address))

    routers: list[RouterFactory] = []
    jobmgr = contextlib.AsyncExitStack()
    jobs: JobManagerClient | None = None
    if platform_apis:
        # jobmgr resolves the harness's model to a real base (the default model's files).
        models = files_root / "models"
        models.mkdir()
        (models / model).symlink_to(default_cache_dir() / "smollm2-135m")
        address = await jobmgr.enter_async_context(
            jobmgr_api(etcd, file_service(etcd, settings.common), models)
        )
        jobs = JobManagerClient(address)
        routers = platform_routers(etcd, settings.common, jobs)
    http = HttpServer(create_app(gateway, routers), "127.0.0.1", 0)
    http_port = await http.start()
    grpc_service = await start_grpc_server(
        [
            lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
                GatewayServicer(gateway), s
            )
        ],
        ["deepserve.v1.GatewayService"],
        host="127.0.0.1",
        port=0,
    )
    yield GatewayHarness(
        gateway=gateway,
        engine=engine,
        tokenizer=smollm_tokenizer,
        http_url=f"http://127.0.0.1:{http_port}",
        grpc_address=f"127.0.0.1:{grpc_service.port}",
        etcd=etcd,
        redis=redis,
        model=model,
        instance_id=instance_id,
        scheduler=scheduler,
    )
    await grpc_service.server.stop(0)
    await http.stop()
    if jobs is not None:
        await jobs.close()
    await jobmgr.aclose()
    shutil.rmtree(files_root, ignore_errors=True)
    await gateway.stop()
    await records.instances(etcd).delete(instance_id)
    await scheduler.stop()
    await engine.stop()
    await redis.close()
    await etcd.close()


@pytest_asyncio.fixture(scope="module")
async def harness(
    etcd_endpoint: str, redis_url: str, smollm_tokenizer: Tokenizer
) -> AsyncIterator[GatewayHarness]:
    async with running_harness(etcd_endpoint, redis_url, smollm_tokenizer) as h:
        yield h
