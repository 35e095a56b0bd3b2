"""Tenants, API keys, per-tenant rate limits and usage: the gateway's accounting concerns."""

from deepserve.tenancy.api_keys import ApiKeyRecord, ApiKeys, hash_api_key, new_api_key
from deepserve.tenancy.rate_limiter import Admission, RateLimiter
from deepserve.tenancy.tenants import TenantLimits, TenantRecord, Tenants
from deepserve.tenancy.usage import UsageMeter, UsageRow

__all__ = [
    "Admission",
    "ApiKeyRecord",
    "ApiKeys",
    "RateLimiter",
    "TenantLimits",
    "TenantRecord",
    "Tenants",
    "UsageMeter",
    "UsageRow",
    "hash_api_key",
    "new_api_key",
]
