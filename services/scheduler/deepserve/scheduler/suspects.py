"""Instances a caller saw fail: routing avoids them at once, long before their lease expires.

A gateway whose engine stream or connection broke reports the instance (`ReportInstanceFailure`).
The replica told marks it in memory, so its very next decision avoids it, and in Redis
(`deepserve:suspect:<instance>`, with a TTL), where every replica's refresh picks the mark up
within a refresh interval. A mark is lifted when the instance's load reports show it alive
after the report (`clear_after_s` past it: a dead process reports nothing, a live one every
half second), so a healthy instance reported by mistake comes back on its own; a dead one stays
avoided until its lease expires and its record leaves the table. The lease stays the truth for
death: jobmgr replaces an instance only when its record is gone.

Redis rather than etcd: a mark is hot, short-lived and lossy-tolerable (losing it only costs the
lease's delay), and it rides on the refresh that already reads the load reports it is lifted by.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import Counter

from deepserve.background import stop_task
from deepserve.metrics import registry
from deepserve.store.redis_messages import SuspectInstance
from deepserve.store.redis_store import RedisStore

log = logging.getLogger(__name__)

SUSPECT_EVENTS = Counter(
    "deepserve_scheduler_suspect_events",
    "Instances marked suspect (reported failing) and lifted (alive after all), per replica",
    ["event"],
    registry=registry(),
)


@dataclass(frozen=True, slots=True)
class SuspectConfig:
    """How long a mark lasts and what lifts it."""

    # Load reports must continue this long after the failure report to lift the mark.
    clear_after_s: float = 1.0
    # A mark outlives any lease: the record is gone (or the instance reported) long before.
    ttl_s: float = 60.0
    refresh_s: float = 0.1


class SuspectInstances:
    """The marks this replica knows (its own and other replicas'), and whether one still holds."""

    def __init__(
        self,
        redis: RedisStore | None,
        live_ids: Callable[[], list[str]],
        report_at: Callable[[str], float],
        *,
        reporter: str = "",
        config: SuspectConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._live_ids = live_ids
        # Unix time of an instance's latest load report (0: none), from the load tracker.
        self._report_at = report_at
        self._reporter = reporter
        self.config = config or SuspectConfig()
        self._clock = clock
        self._marks: dict[str, SuspectInstance] = {}
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="suspect-instances")

    async def stop(self) -> None:
        await stop_task(self._task)

    def report(self, instance_id: str, reason: str) -> None:
        """Marks an instance now, here and (in the background) for every other replica."""
        mark = SuspectInstance(since=self._clock(), reason=reason, reporter=self._reporter)
        if instance_id not in self._marks:
            SUSPECT_EVENTS.labels("marked").inc()
            log.warning(
                "instance reported failing; routing avoids it",
                extra={"fields": {"instance_id": instance_id, "reason": reason}},
            )
        self._marks[instance_id] = mark
        if self._redis is not None:
            task = asyncio.create_task(self._publish(instance_id, mark))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def suspects(self, instance_ids: Iterable[str]) -> set[str]:
        """Those of `instance_ids` routing should avoid now."""
        return {i for i in instance_ids if i in self._marks and self._holds(i)}

    @property
    def marked(self) -> dict[str, SuspectInstance]:
        return dict(self._marks)

    def _holds(self, instance_id: str) -> bool:
        mark = self._marks[instance_id]
        if self._report_at(instance_id) > mark.since + self.config.clear_after_s:
            del self._marks[instance_id]
            SUSPECT_EVENTS.labels("lifted").inc()
            log.info(
                "suspect instance reports load again; routing to it resumes",
                extra={"fields": {"instance_id": instance_id}},
            )
            return False
        return True

    async def _publish(self, instance_id: str, mark: SuspectInstance) -> None:
        assert self._redis is not None
        try:
            await self._redis.mark_suspect(instance_id, mark, self.config.ttl_s)
        except Exception as exc:  # lossy-tolerable: this replica still avoids it
            log.warning("sharing the suspect mark of %s failed: %s", instance_id, exc)

    async def refresh(self) -> None:
        """Adopts other replicas' marks; forgets instances no longer live or lifted."""
        live = self._live_ids()
        live_set = set(live)
        for instance_id in [i for i in self._marks if i not in live_set]:
            del self._marks[instance_id]
        if self._redis is None:
            return
        for instance_id, mark in (await self._redis.read_suspects(live)).items():
            mine = self._marks.get(instance_id)
            if mine is None or mark.since > mine.since:
                if self._report_at(instance_id) > mark.since + self.config.clear_after_s:
                    continue  # already lifted (its reports continued after the mark)
                self._marks[instance_id] = mark

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # lossy-tolerable: keep the marks this replica has
                log.warning("reading suspect marks failed: %s", exc)
            await asyncio.sleep(self.config.refresh_s)
