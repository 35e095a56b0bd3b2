"""Line-by-line checks of uploaded JSONL, per purpose; the first bad line is named in the error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from deepserve.errors import InvalidArgument
from deepserve.files.file_records import FilePurpose

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
BATCH_URLS = frozenset({"/v1/chat/completions"})


def iter_jsonl(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line; raises naming the bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the file is not UTF-8 (byte {exc.start})", field="file") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})", field="file"
            ) from None
        if not isinstance(value, dict):
            raise InvalidArgument(f"line {number}: expected a JSON object", field="file")
        yield number, value


def check_chat_messages(messages: Any, where: str) -> None:
    """A non-empty list of {role, content} with known roles and text content."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(f"{where}: 'messages' must be a non-empty list", field="file")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"{where}: messages[{i}] is not an object", field="file")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"{where}: messages[{i}].role {role!r} is not one of {sorted(CHAT_ROLES)}",
                field="file",
            )
        content = message.get("content")
        if not isinstance(content, str) and not (role == "assistant" and message.get("tool_calls")):
            raise InvalidArgument(f"{where}: messages[{i}].content must be a string", field="file")


def _check_fine_tune_line(number: int, line: dict[str, Any]) -> None:
    where = f"line {number}"
    if "messages" not in line:
        raise InvalidArgument(f"{where}: missing 'messages' (chat format expected)", field="file")
    messages = line["messages"]
    check_chat_messages(messages, where)
    if not any(m.get("role") == "assistant" for m in messages):
        raise InvalidArgument(f"{where}: no assistant message to learn from", field="file")


def _check_batch_line(number: int, line: dict[str, Any], seen: set[str]) -> None:
    where = f"line {number}"
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidArgument(f"{where}: 'custom_id' must be a non-empty string", field="file")
    if custom_id in seen:
        raise InvalidArgument(f"{where}: duplicate custom_id {custom_id!r}", field="file")
    seen.add(custom_id)
    if line.get("method") != "POST":
        raise InvalidArgument(f"{where}: 'method' must be \"POST\"", field="file")
    if line.get("url") not in BATCH_URLS:
        raise InvalidArgument(
            f"{where}: 'url' {line.get('url')!r} is not supported (use /v1/chat/completions)",
            field="file",
        )
    body = line.get("body")
    if not isinstance(body, dict):
        raise InvalidArgument(f"{where}: 'body' must be an object", field="file")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidArgument(f"{where}: body.model is required", field="file")
    check_chat_messages(body.get("messages"), f"{where}: body")


def validate_jsonl(purpose: FilePurpose, data: bytes) -> int:
    """Checks every line for the purpose; returns the number of records."""
    seen: set[str] = set()
    count = 0
    for number, line in iter_jsonl(data):
        if purpose == FilePurpose.FINE_TUNE:
            _check_fine_tune_line(number, line)
        elif purpose == FilePurpose.BATCH:
            _check_batch_line(number, line, seen)
        count += 1
    if count == 0:
        raise InvalidArgument("the file holds no records", field="file")
    return count
