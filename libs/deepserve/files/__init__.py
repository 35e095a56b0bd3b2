"""Uploaded files (OpenAI Files API): content in a blob store, metadata records in etcd."""

from deepserve.files.blob_store import FileStore, LocalFileStore, default_files_root
from deepserve.files.file_records import FilePurpose, FileRecord
from deepserve.files.file_service import FileService
from deepserve.files.validation import validate_jsonl

__all__ = [
    "FilePurpose",
    "FileRecord",
    "FileService",
    "FileStore",
    "LocalFileStore",
    "default_files_root",
    "validate_jsonl",
]
