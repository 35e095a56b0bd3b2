"""API keys, tenant limits, the Redis rate limiter (exact under concurrency) and usage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from deepserve.cli import tenancy as tenancy_cli
from deepserve.errors import NotFound, ResourceExhausted, Unauthenticated
from deepserve.gateway.auth import Authenticator, bearer_token
from deepserve.gateway.settings import GatewaySettings
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.api_keys import ApiKeys, hash_api_key
from deepserve.tenancy.rate_limiter import RateLimiter
from deepserve.tenancy.tenants import TenantLimits, Tenants
from deepserve.tenancy.usage import UsageMeter

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        yield store


@pytest_asyncio.fixture
async def redis_clients(redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:
    """Two independent clients: two gateway replicas as far as Redis can tell."""
    # A generous socket timeout: this shared 2-core machine sometimes stalls for seconds.
    clients = [aioredis.Redis.from_url(redis_url, socket_timeout=30) for _ in range(2)]
    yield clients
    for c in clients:
        await c.aclose()


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


async def test_api_key_is_stored_only_as_hash(etcd: EtcdStore) -> None:
    keys = ApiKeys(etcd)
    key, record = await keys.create("acme-" + uuid.uuid4().hex[:4], "ci")
    assert key.startswith("ds-") and len(key) > 40
    stored = await etcd.get(keys.records.key(record.key_hash))
    assert stored is not None and key.encode() not in stored.value
    assert record.key_hash == hash_api_key(key)
    assert (await keys.lookup(key)) == record
    assert (await keys.revoke(record.key_id)).key_hash == record.key_hash
    assert await keys.lookup(key) is None
    with pytest.raises(NotFound):
        await keys.revoke(record.key_id)


async def test_authenticator_modes(etcd: EtcdStore) -> None:
    name = tenant()
    key, _ = await ApiKeys(etcd).create(name)
    await Tenants(etcd).set_limits(name, TenantLimits(requests_per_min=5))
    closed = Authenticator(etcd, GatewaySettings(auth_open=False, default_max_concurrent=3))
    opened = Authenticator(etcd, GatewaySettings(auth_open=True, open_tenant="demo"))
    for auth in (closed, opened):
        auth.start()
        await asyncio.wait_for(auth.wait_ready(), 30)
    try:
        assert await closed.keys.wait_for(lambda k: hash_api_key(key) in k, 30)
        assert await closed.tenants.wait_for(lambda t: name in t, 30)
        caller = closed.authenticate(f"Bearer {key}")
        assert (caller.tenant, caller.limits.requests_per_min) == (name, 5)
        with pytest.raises(Unauthenticated):
            closed.authenticate(None)
        with pytest.raises(Unauthenticated):
            closed.authenticate("Bearer ds-unknown")
        assert opened.authenticate(None).tenant == "demo"
        assert opened.authenticate("Bearer EMPTY").tenant == "demo"
        assert closed.limits_of("nobody").max_concurrent == 3
    finally:
        await closed.stop()
        await opened.stop()
    assert bearer_token("Basic abc") is None
    assert bearer_token("bearer  tok ") == "tok"


async def test_requests_per_min_is_exact_across_replicas(
    redis_clients: list[aioredis.Redis],
) -> None:
    limiters = [RateLimiter(c) for c in redis_clients]
    name, limits = tenant(), TenantLimits(requests_per_min=10)

    async def try_admit(i: int) -> bool:
        try:
            await limiters[i % 2].admit(name, f"r{i}", limits, 1)
            return True
        except ResourceExhausted as exc:
            assert exc.field == "requests_per_min"
            assert exc.retry_after_s is not None and 1 <= exc.retry_after_s <= 60
            return False

    admitted = await asyncio.gather(*(try_admit(i) for i in range(60)))
    assert sum(admitted) == 10


async def test_concurrency_slots_are_exact_and_released(
    redis_clients: list[aioredis.Redis],
) -> None:
    limiters = [RateLimiter(c) for c in redis_clients]
    name, limits = tenant(), TenantLimits(max_concurrent=3)
    results = await asyncio.gather(
        *(limiters[i % 2].admit(name, f"r{i}", limits, 1) for i in range(20)),
        return_exceptions=True,
    )
    held = [r for r in results if not isinstance(r, BaseException)]
    assert len(held) == 3
    await limiters[0].finish(held[0], 1)
    await limiters[0].finish(held[0], 1)  # idempotent: frees one slot, not two
    await limiters[1].admit(name, "late", limits, 1)
    with pytest.raises(ResourceExhausted):
        await limiters[1].admit(name, "later", limits, 1)


async def test_a_repeated_request_id_is_a_new_request(
    redis_clients: list[aioredis.Redis],
) -> None:
    """Request ids can come from clients (x-request-id): reusing one must not get past a limit."""
    limiter = RateLimiter(redis_clients[0])
    name, limits = tenant(), TenantLimits(max_concurrent=1)
    await limiter.admit(name, "same", limits, 1)
    with pytest.raises(ResourceExhausted):
        await limiter.admit(name, "same", limits, 1)


async def test_a_timeout_is_asked_again_not_let_in_unchecked(
    redis_clients: list[aioredis.Redis],
) -> None:
    limiter = RateLimiter(redis_clients[0])
    real = limiter._admit
    calls = 0

    async def landed_then_timed_out(**kwargs: object) -> object:
        nonlocal calls
        calls += 1
        result = await real(**kwargs)
        if calls == 1:
            raise RedisTimeoutError("Timeout reading")  # the reply was lost, the slot was not
        return result

    limiter._admit = landed_then_timed_out  # type: ignore[method-assign]
    name = tenant()
    limits = TenantLimits(max_concurrent=1, requests_per_min=2, tokens_per_min=100)
    admission = await limiter.admit(name, "a", limits, 60)
    assert calls == 2 and not admission.finished  # checked by Redis, holds a real slot
    other = RateLimiter(redis_clients[1])
    with pytest.raises(ResourceExhausted) as refused:
        await other.admit(name, "b", limits, 10)
    assert refused.value.field == "max_concurrent"
    await limiter.finish(admission, 60)
    await other.admit(name, "b", limits, 10)  # one request and 60 tokens counted, not two


async def test_abandoned_concurrency_slot_expires(redis_clients: list[aioredis.Redis]) -> None:
    # A TTL far above two Redis calls' time on a loaded host, so the refusal is certain.
    limiter = RateLimiter(redis_clients[0], slot_ttl_s=1.0)
    name, limits = tenant(), TenantLimits(max_concurrent=1)
    await limiter.admit(name, "crashed-gateway", limits, 1)  # never finished
    with pytest.raises(ResourceExhausted):
        await limiter.admit(name, "next", limits, 1)
    await asyncio.sleep(1.2)
    await limiter.admit(name, "next", limits, 1)


async def test_tokens_per_min_corrected_to_actual(redis_clients: list[aioredis.Redis]) -> None:
    limiter = RateLimiter(redis_clients[0])
    name, limits = tenant(), TenantLimits(tokens_per_min=100)
    first = await limiter.admit(name, "a", limits, 90)
    with pytest.raises(ResourceExhausted) as refused:
        await limiter.admit(name, "b", limits, 20)
    assert refused.value.field == "tokens_per_min"
    await limiter.finish(first, 30)  # used far less than estimated
    await limiter.admit(name, "b", limits, 60)


async def test_window_slides(redis_clients: list[aioredis.Redis]) -> None:
    limiter = RateLimiter(redis_clients[0], window_s=0.3)
    name, limits = tenant(), TenantLimits(requests_per_min=1)
    await limiter.admit(name, "a", limits, 1)
    with pytest.raises(ResourceExhausted):
        await limiter.admit(name, "b", limits, 1)
    await asyncio.sleep(0.35)
    await limiter.admit(name, "b", limits, 1)


async def test_usage_accumulates_per_tenant_and_model(redis_clients: list[aioredis.Redis]) -> None:
    meter = UsageMeter(redis_clients[0])
    name = tenant()
    await meter.record(name, "m1", 10, 5)
    await meter.record(name, "m1", 1, 2)
    await meter.record(name, "m2", 7, 0)
    rows = await meter.read(name)
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("m1", 2, 11, 7),
        ("m2", 1, 7, 0),
    ]
    assert rows[0].total_tokens == 18


def test_cli_keys_limits_and_usage(
    etcd_endpoint: str, redis_url: str, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    stores = ["--etcd", etcd_endpoint, "--redis", redis_url, "--run-dir", str(tmp_path)]
    name = tenant()
    assert tenancy_cli.main(["keys", "create", "--tenant", name, *stores]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("ds-")
    assert tenancy_cli.main(["keys", "list", "--tenant", name, *stores]) == 0
    listed = capsys.readouterr().out
    assert hash_api_key(key)[:12] in listed and key not in listed
    assert tenancy_cli.main(["tenants", "set-limits", name, "--rpm", "7", *stores]) == 0
    assert "rpm 7" in capsys.readouterr().out
    asyncio.run(_record_usage(redis_url, name))
    assert tenancy_cli.main(["usage", "--tenant", name, *stores]) == 0
    out = capsys.readouterr().out
    assert name in out and "smollm2-135m" in out and " 12 " in out
    assert tenancy_cli.main(["keys", "revoke", hash_api_key(key)[:12], *stores]) == 0


async def _record_usage(redis_url: str, name: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await UsageMeter(client).record(name, "smollm2-135m", 12, 3)
    await client.aclose()


async def test_unreachable_redis_admits_unchecked() -> None:
    from deepserve.processes import free_port

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    limiter = RateLimiter(client)
    name, limits = tenant(), TenantLimits(requests_per_min=1)
    # Past the limit of 1 request/min: a checked limiter would refuse the second one.
    admissions = [await limiter.admit(name, f"r{n}", limits, 1) for n in range(3)]
    # Admitted unchecked: nothing was taken in Redis, so there is nothing to release.
    assert all(a.finished for a in admissions)
    for admission in admissions:
        await limiter.finish(admission, 1)
    await client.aclose()
