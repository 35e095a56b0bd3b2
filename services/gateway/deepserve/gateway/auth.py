"""Who is calling: `Authorization: Bearer <key>` -> tenant and limits, from in-memory mirrors.

API keys (hashes) and tenant records are mirrored from etcd by watches, so checking a key
costs one SHA-256 and a dict lookup, and a revoked key stops working as soon as etcd says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepserve.errors import FailedPrecondition, Unauthenticated
from deepserve.gateway.settings import GatewaySettings
from deepserve.processes import is_loopback
from deepserve.store.etcd import EtcdStore
from deepserve.store.informer import Informer
from deepserve.tenancy.api_keys import ApiKeyRecord, ApiKeys, hash_api_key
from deepserve.tenancy.tenants import TenantLimits, TenantRecord, Tenants


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated tenant of a call and the limits that apply to it."""

    tenant: str
    limits: TenantLimits
    key_id: str = ""


def check_open_mode(settings: GatewaySettings, host: str) -> None:
    """Refuses open mode (no keys) on an address others can reach, unless allowed explicitly."""
    if settings.auth_open and not settings.auth_open_allow_remote and not is_loopback(host):
        raise FailedPrecondition(
            f"open mode (DEEPSERVE_GATEWAY_AUTH_OPEN=true: no API key needed) would serve "
            f"anyone who reaches {host}; listen on a loopback address, require keys, or set "
            "DEEPSERVE_GATEWAY_AUTH_OPEN_ALLOW_REMOTE=true to accept that",
            field="auth_open",
        )


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    """Maps API keys to callers; in open mode every call is let in (the local demo)."""

    def __init__(self, store: EtcdStore, settings: GatewaySettings) -> None:
        self._settings = settings
        self.keys: Informer[ApiKeyRecord] = Informer(ApiKeys(store).records)
        self.tenants: Informer[TenantRecord] = Informer(Tenants(store).records)
        self._default_limits = TenantLimits(
            requests_per_min=settings.default_requests_per_min,
            tokens_per_min=settings.default_tokens_per_min,
            max_concurrent=settings.default_max_concurrent,
        )

    def start(self) -> None:
        self.keys.start()
        self.tenants.start()

    async def wait_ready(self) -> None:
        await self.keys.ready.wait()
        await self.tenants.ready.wait()

    async def stop(self) -> None:
        await self.keys.stop()
        await self.tenants.stop()

    def limits_of(self, tenant: str) -> TenantLimits:
        record = self.tenants.items.get(tenant)
        return record.limits if record is not None else self._default_limits

    def authenticate(self, authorization: str | None) -> Caller:
        token = bearer_token(authorization)
        record = self.keys.items.get(hash_api_key(token)) if token else None
        if record is not None:
            return Caller(record.tenant, self.limits_of(record.tenant), record.key_id)
        if self._settings.auth_open:
            tenant = self._settings.open_tenant
            return Caller(tenant, self.limits_of(tenant))
        if token is None:
            raise Unauthenticated(
                "missing API key: send it as 'Authorization: Bearer <key>' "
                "(create one with `deepserve keys create --tenant NAME`)"
            )
        raise Unauthenticated("incorrect API key provided")
