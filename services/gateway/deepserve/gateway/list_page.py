"""OpenAI's cursor pagination over an already ordered list of objects (`after` + `limit`)."""

from __future__ import annotations

from typing import Any


def list_page(
    items: list[dict[str, Any]], after: str | None, limit: int, *, with_ids: bool = False
) -> dict[str, Any]:
    """The `list` object holding up to `limit` (1-100) items after the one with id `after`.

    `with_ids` adds `first_id`/`last_id`, which some OpenAI lists (batches) carry.
    """
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = max(1, min(limit, 100))
    page = items[:limit]
    body: dict[str, Any] = {"object": "list", "data": page}
    if with_ids:
        body["first_id"] = page[0]["id"] if page else None
        body["last_id"] = page[-1]["id"] if page else None
    body["has_more"] = len(items) > limit
    return body
