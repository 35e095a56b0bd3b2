"""Request migration: when an engine request's instance dies mid-stream, where it goes on.

The dispatcher keeps the tokens each choice has streamed. When the instance serving it fails
(its stream or connection broke, or it ended the stream unfinished), the choice is routed
again, excluding the instances it has failed on, and sent to the new instance with those tokens
as `output_token_ids`: the engine computes prompt + tokens (the prefix cache makes most of it a
hit) and continues with the next token, its limits, penalties, stop rules, seeded sampler and
detokenizer carrying on as if nothing happened. So the client sees one unbroken stream.

A disaggregated pair that fails before the first token is placed again (the prefill is redone
elsewhere). Once tokens exist, a resumed request runs on one instance: the decode (or
colocated) instance the scheduler picks computes the prompt itself.

Every migration is counted (`deepserve_request_migrations`) and shows in the request's trace
as a `migrate` span; the instance that failed is reported to the scheduler, which stops routing
to it at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter

from deepserve.metrics import registry

MIGRATIONS = Counter(
    "deepserve_request_migrations",
    "Engine requests moved to another instance after theirs failed mid-stream, by outcome "
    "(migrated; exhausted: the per-request limit was used up; no_instance: none left to go to)",
    ["model", "outcome"],
    registry=registry(),
)

# Codes a broken stream or connection ends a call with: the instance (or the way to it) failed.
INSTANCE_FAILURE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
)
# Codes that are the instance's refusal, worth another instance before a request's first token.
REFUSAL_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION})


@dataclass(frozen=True, slots=True)
class MigrationPolicy:
    """How often an engine request may move: before its first token and after it."""

    # Re-routes of a request that failed before its first token (no token to carry over).
    retries: int = 1
    # Moves of a request that failed mid-stream, each resuming with the tokens streamed so far.
    max_migrations: int = 2


@dataclass(slots=True)
class RequestPath:
    """One engine request's path so far: the tokens streamed and the instances that failed."""

    generated: list[int] = field(default_factory=list)
    failed_instances: list[str] = field(default_factory=list)
    retries: int = 0
    migrations: int = 0

    @property
    def started(self) -> bool:
        return bool(self.generated)

    def may_move(self, policy: MigrationPolicy) -> bool:
        if self.started:
            return self.migrations < policy.max_migrations
        return self.retries < policy.retries

    def moved(self) -> None:
        if self.started:
            self.migrations += 1
        else:
            self.retries += 1
