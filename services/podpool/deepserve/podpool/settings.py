"""The podpool service's settings, read from `DEEPSERVE_PODPOOL_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from deepserve.config import ServiceSettings


class PodPoolSettings(ServiceSettings):
    """podpool: the warm pool's size, its pod backend and DRAM pre-loading."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_PODPOOL_", extra="ignore")

    grpc_port: int = 50053
    # Warm (model-less, runtime started) pods the pool keeps ready for the next task. Warm pods
    # started elsewhere (e.g. `deepserve up`'s first pod) count; 0 starts pods only on demand.
    warm_pods: int = 0
    # Upper bound on pods this pool runs at once (warm + assigned + starting).
    max_pods: int = 64
    # Where pods run: "local" (processes on this host); "hosts" (spread over the host agents
    # registered in etcd, `python -m deepserve.podpool.host_agent` on each host);
    # "kubernetes" is the production target.
    backend: str = "local"
    # Seconds a new pod may take to register as warm before it is given up on.
    pod_start_timeout_s: float = 120.0
    # Device for the pods it starts (npu, cuda, cpu; empty picks the best available).
    pod_device: str = ""
    # Where the local backend writes each pod's log; empty uses a temporary folder.
    pod_log_dir: Path | None = None
    # DRAM pre-loading: models whose weights this host always keeps in shared memory
    # (comma-separated names or paths), plus this many recently scaled-up models.
    dram_models: str = ""
    dram_recent_models: int = 2
    # Upper bound on the shared memory the copies may take (0: no bound beyond the host's).
    dram_budget_mb: int = 0
    # The host's weights cache (the pods' DEEPSERVE_FLOWSERVE_WEIGHTS_CACHE_DIR); empty disables
    # DRAM pre-loading.
    weights_cache_dir: Path | None = Path("/dev/shm/deepserve-weights")
    # Fork: let a new instance stream its weights from a running one of the same model.
    fork: bool = True
    # How pods start: "process" (a new Python process each) or "zygote" (forked from one
    # process that imported the runtime once: faster, and pods share its memory pages).
    pod_start: str = "process"
    # GOMP_SPINCOUNT for the pods; -1 (default) leaves OpenMP's own (300k spins before an idle
    # team thread sleeps). On a host whose cores the pods have to themselves, spinning wins:
    # a training pod ran 0.94x the direct loop with it and 0.76x with 0 (bench/finetune.py,
    # 2026-12-06), and a quiet 2-core host served 1.0-1.3x the tokens/s with it
    # (bench/serve_vs_vllm.py). Where pods share cores with much else (a loaded dev host),
    # a spinning partner burns the time slice its team needs: there 0 made a 2-thread decode
    # step 5-7x faster (load 7-34). Bursts of packed pods set 20k. A GOMP_SPINCOUNT or
    # OMP_WAIT_POLICY in the environment wins.
    pod_openmp_spin_count: int = -1
    # CPU threads per pod (0: one per core). Pods packed many to a core (a burst of 64 on a
    # small host) run better with 1 each: no OpenMP team waits on a descheduled partner.
    pod_threads: int = 0
    # Model loads (LoadModel on a claimed pod) run at once on this host; the rest queue (0: no
    # bound). Loads share the host's cores: a bound brings the first instances up sooner.
    max_concurrent_loads: int = 0
    # New warm pods wait while a burst is loading: until no load is in flight and no acquire
    # came for this long (at most 10x this). A pod started mid-burst takes the burst's cores
    # (imports, tokenizers) exactly when 64 loads need them. 0: refill at once.
    refill_defer_s: float = 1.0


class HostAgentSettings(ServiceSettings):
    """A host agent (`python -m deepserve.podpool.host_agent`): starts the pods of its host for
    a podpool elsewhere. Its pods take the pool's pod settings (`DEEPSERVE_PODPOOL_POD_*`,
    weights cache, DRAM models) from this host's environment."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_PODHOST_", extra="ignore")

    grpc_port: int = 50054
    pods: PodPoolSettings = Field(default_factory=PodPoolSettings)
