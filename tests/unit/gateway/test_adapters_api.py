"""LoRA adapters through the gateway: registration (checked by a real JobManagerService),
tenant-private listing, a request naming an adapter as its model, and the refusals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from deepserve.tokenizer import Tokenizer
from tests.lora_adapters import write_synthetic_adapter
from tests.unit.flowserve.runner.tiny_models import save_tiny_model
from tests.unit.gateway.conftest import GatewayHarness, running_harness
from tests.unit.jobmgr.api_server import MAX_LORA_RANK

pytestmark = pytest.mark.timeout(90)


@pytest_asyncio.fixture(scope="module")
async def platform(
    etcd_endpoint: str, redis_url: str, smollm_tokenizer: Tokenizer
) -> AsyncIterator[GatewayHarness]:
    async with running_harness(etcd_endpoint, redis_url, smollm_tokenizer, platform_apis=True) as h:
        yield h


async def new_client(platform: GatewayHarness) -> tuple[str, httpx.AsyncClient]:
    tenant, key = await platform.new_key()
    headers = {"authorization": f"Bearer {key}"}
    return tenant, httpx.AsyncClient(base_url=platform.http_url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def good_adapter(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_adapter(
        default_model_dir, tmp_path_factory.mktemp("good"), rank=8, targets=["q_proj", "v_proj"]
    )


async def register(
    client: httpx.AsyncClient, name: str, model: str, adapter: Path, **replace: bytes
) -> httpx.Response:
    files = {
        "adapter_config": (
            "adapter_config.json",
            replace.get("config", (adapter / "adapter_config.json").read_bytes()),
        ),
        "adapter_model": (
            "adapter_model.safetensors",
            replace.get("weights", (adapter / "adapter_model.safetensors").read_bytes()),
        ),
    }
    return await client.post("/v1/adapters", data={"name": name, "model": model}, files=files)


async def chat(client: httpx.AsyncClient, model: str) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hello " * 30}]},
    )


async def test_a_registered_adapter_is_listed_and_served_for_its_tenant_only(
    platform: GatewayHarness, good_adapter: Path
) -> None:
    tenant, client = await new_client(platform)
    _, other = await new_client(platform)
    async with client, other:
        reply = await register(client, "support-bot", platform.model, good_adapter)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["id"] == "support-bot" and body["rank"] == 8
        assert body["base_model"] == platform.model and body["owned_by"] == tenant
        # The gateway's mirror of adapter records catches up, then the model is listed.
        assert await platform.gateway.models.adapters.wait_for(
            lambda items: f"{tenant}/support-bot" in items, 30
        )
        mine = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        assert "support-bot" in mine and platform.model in mine
        theirs = [m["id"] for m in (await other.get("/v1/models")).json()["data"]]
        assert "support-bot" not in theirs
        listed = (await client.get("/v1/adapters")).json()["data"]
        assert [a["id"] for a in listed] == ["support-bot"]

        base_reply = await chat(client, platform.model)
        base_route = platform.scheduler.requests[-1]
        reply = await chat(client, "support-bot")
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "support-bot"
        route = platform.scheduler.requests[-1]
        assert route.model == platform.model
        assert route.adapter.startswith(f"{tenant}/support-bot@")
        sent = platform.engine.record.seen[-1]
        assert sent.model == platform.model and sent.adapter == route.adapter
        assert Path(sent.adapter_path).name.startswith("support-bot-")
        # Same prompt, other namespace: no prefix hash is shared with the base model's.
        assert base_reply.status_code == 200
        assert route.prefix_block_hashes and base_route.prefix_block_hashes
        assert not set(route.prefix_block_hashes) & set(base_route.prefix_block_hashes)

        refused = await chat(other, "support-bot")
        assert refused.status_code == 404
        assert refused.json()["error"]["param"] == "model"

        deleted = await client.delete("/v1/adapters/support-bot")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert await platform.gateway.models.adapters.wait_for(
            lambda items: f"{tenant}/support-bot" not in items, 30
        )
        assert (await chat(client, "support-bot")).status_code == 404
        assert (await client.delete("/v1/adapters/support-bot")).status_code == 404


async def test_bad_adapters_are_refused_at_registration_with_the_reason(
    platform: GatewayHarness, good_adapter: Path, default_model_dir: Path, tmp_path: Path
) -> None:
    _, client = await new_client(platform)
    async with client:
        too_big = write_synthetic_adapter(
            default_model_dir, tmp_path / "big", rank=MAX_LORA_RANK * 2
        )
        reply = await register(client, "big", platform.model, too_big)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["param"] == "adapter_config.r" and "exceeds the limit" in error["message"]

        other_base = save_tiny_model(tmp_path / "tiny")
        mismatched = write_synthetic_adapter(other_base, tmp_path / "tiny-lora", rank=4)
        reply = await register(client, "mismatch", platform.model, mismatched)
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "model"
        assert "the base model needs" in reply.json()["error"]["message"]

        reply = await register(client, "garbage", platform.model, good_adapter, weights=b"x" * 64)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "adapter_model"

        reply = await register(client, "noconf", platform.model, good_adapter, config=b"{not json")
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "adapter_config"

        dora = json.loads((good_adapter / "adapter_config.json").read_text()) | {"use_dora": True}
        reply = await register(
            client, "dora", platform.model, good_adapter, config=json.dumps(dora).encode()
        )
        assert reply.status_code == 400 and "DoRA" in reply.json()["error"]["message"]

        reply = await register(client, "../escape", platform.model, good_adapter)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "name"

        reply = await register(client, "nobase", "no-such-model", good_adapter)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "model"

        reply = await register(client, "dup", platform.model, good_adapter)
        assert reply.status_code == 200
        again = await register(client, "dup", platform.model, good_adapter)
        assert again.status_code == 409 and again.json()["error"]["param"] == "name"
        assert [a["id"] for a in (await client.get("/v1/adapters")).json()["data"]] == ["dup"]
