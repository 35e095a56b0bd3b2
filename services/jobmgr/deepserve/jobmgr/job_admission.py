"""Admits new jobs: checks the spec and the files it names, then creates the job record.

CreateJob's domain, so a gRPC client gets the same refusals (naming the field) as the
gateway's HTTP callers: the spec's own bounds first, then that each file exists for the
job's tenant and was uploaded for the right purpose.
"""

from __future__ import annotations

from deepserve.errors import InvalidArgument, NotFound
from deepserve.files import FilePurpose, FileRecord, FileService
from deepserve.jobs.batch import BatchSpec
from deepserve.jobs.fine_tuning import FineTuningSpec
from deepserve.jobs.records import JobRecord, ServingSpec
from deepserve.jobs.store import JobStore
from deepserve.store.etcd import Versioned

JobSpec = ServingSpec | FineTuningSpec | BatchSpec


class JobAdmission:
    """Checks and creates jobs of every kind."""

    def __init__(self, jobs: JobStore, files: FileService) -> None:
        self._jobs = jobs
        self._files = files

    async def create(self, spec: JobSpec, job_id: str = "") -> Versioned[JobRecord]:
        if isinstance(spec, ServingSpec):
            return await self._jobs.create_serving(spec, job_id)
        if isinstance(spec, FineTuningSpec):
            spec = spec.normalized()
            await self._file(
                spec.training_file, spec.tenant, FilePurpose.FINE_TUNE, "training_file"
            )
            if spec.validation_file:
                await self._file(
                    spec.validation_file, spec.tenant, FilePurpose.FINE_TUNE, "validation_file"
                )
            return await self._jobs.create_fine_tuning(spec, job_id)
        spec = spec.normalized()
        found = await self._file(
            spec.input_file_id, spec.tenant, FilePurpose.BATCH, "input_file_id"
        )
        return await self._jobs.create_batch(spec, found.lines, job_id)

    async def _file(
        self, file_id: str, tenant: str, purpose: FilePurpose, field: str
    ) -> FileRecord:
        """The tenant's file; another tenant's file is as missing as one that never was."""
        try:
            record = await self._files.get(file_id, tenant)
        except NotFound:
            raise InvalidArgument(f"file {file_id} does not exist", field=field) from None
        if record.purpose != purpose:
            raise InvalidArgument(
                f"file {file_id} has purpose {record.purpose.value!r}, not {purpose.value!r}",
                field=field,
            )
        return record
