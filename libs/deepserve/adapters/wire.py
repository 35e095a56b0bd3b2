"""AdapterRecord <-> the jobmgr `Adapter` message, both ways (jobmgr and its clients share it)."""

from __future__ import annotations

from deepserve.adapters.records import AdapterRecord
from deepserve.v1 import jobmgr_pb2 as pb


def adapter_to_proto(record: AdapterRecord) -> pb.Adapter:
    return pb.Adapter(
        name=record.name,
        tenant=record.tenant,
        base_model=record.base_model,
        path=record.path,
        rank=record.rank,
        source=record.source,
        job_id=record.job_id,
        created_at_unix=record.created_at,
    )


def adapter_from_proto(message: pb.Adapter) -> AdapterRecord:
    record = AdapterRecord(
        name=message.name,
        tenant=message.tenant,
        base_model=message.base_model,
        path=message.path,
        rank=message.rank,
        source=message.source or "upload",
        job_id=message.job_id,
    )
    if message.created_at_unix:
        record.created_at = message.created_at_unix
    return record
