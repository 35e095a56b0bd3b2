"""Request ids: the client's own when it is a sane token, a fresh one otherwise."""

from __future__ import annotations

import re
import uuid

_SAFE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_from(given: str | None) -> str:
    """`given` if it is safe to echo in headers and gRPC metadata, else a new random id."""
    if given and _SAFE.fullmatch(given):
        return given
    return uuid.uuid4().hex
