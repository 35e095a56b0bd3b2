"""Uploaded files' metadata as stored under /deepserve/files/<file id>."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class FilePurpose(StrEnum):
    FINE_TUNE = "fine-tune"
    BATCH = "batch"
    # Written by the platform: a batch's output and error files.
    BATCH_OUTPUT = "batch_output"


class FileRecord(BaseModel):
    """One file: who owns it, what it is for, and the digest of its bytes in the blob store."""

    file_id: str
    filename: str
    purpose: FilePurpose
    bytes: int
    sha256: str
    tenant: str = ""
    lines: int = 0
    created_at: float = Field(default_factory=time.time)

    def openai(self) -> dict[str, Any]:
        """The OpenAI `file` object."""
        return {
            "id": self.file_id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose.value,
            "status": "processed",
            "status_details": None,
        }
