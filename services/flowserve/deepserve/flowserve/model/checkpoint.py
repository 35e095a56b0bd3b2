"""Read a Llama-family checkpoint from safetensors, each tensor-parallel rank reading only its shard.

Files are memory-mapped with `safetensors.safe_open`; `get_slice` reads just the rows (column-
parallel: q, k, v, gate, up) or columns (row-parallel: o, down) that a rank owns, so a rank never
pulls the whole matrix into memory. Embeddings and lm_head are replicated on every rank for now
(only rank 0 keeps lm_head, since only it computes logits); a vocab-parallel split is future work.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from deepserve.errors import InvalidArgument, NotFound
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.llama_weights import DecoderLayerWeights, LlamaWeights


class SafetensorsCheckpoint:
    """Memory-mapped access to the tensors of all `*.safetensors` shards in a model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        files = _shard_files(self.model_dir)
        self._handles: dict[Path, Any] = {
            f: safe_open(str(f), framework="pt", device="cpu") for f in files
        }
        self._file_of: dict[str, Path] = {}
        for path, handle in self._handles.items():
            for name in handle.keys():
                self._file_of[name] = path

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def names(self) -> set[str]:
        return set(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def full(self, name: str) -> torch.Tensor:
        return self._handles[self._file(name)].get_tensor(name)

    def rows(self, name: str, rank: int, world: int) -> torch.Tensor:
        """Rank's contiguous 1/world share of dim 0 (column-parallel weight or bias)."""
        size = self.shape(name)[0]
        start, stop = _split_range(name, size, rank, world)
        return self._slice(name)[start:stop]

    def columns(self, name: str, rank: int, world: int) -> torch.Tensor:
        """Rank's contiguous 1/world share of dim 1 (row-parallel weight)."""
        size = self.shape(name)[1]
        start, stop = _split_range(name, size, rank, world)
        return self._slice(name)[:, start:stop]

    def _file(self, name: str) -> Path:
        try:
            return self._file_of[name]
        except KeyError:
            raise NotFound(f"tensor {name} not in checkpoint {self.model_dir}") from None

    def _slice(self, name: str) -> Any:
        return self._handles[self._file(name)].get_slice(name)


def read_checkpoint(
    model_dir: str | Path,
    config: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> LlamaWeights:
    """Read this rank's shard of every weight, fuse projections, and place them on `device`."""

    def place(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    with SafetensorsCheckpoint(model_dir) as ckpt:

        def rows(name: str) -> torch.Tensor:
            return ckpt.rows(name, tp_rank, tp_size)

        def optional_rows(names: list[str]) -> torch.Tensor | None:
            if not all(ckpt.has(n) for n in names):
                return None
            return place(torch.cat([rows(n) for n in names]))

        def optional_full(name: str) -> torch.Tensor | None:
            return place(ckpt.full(name)) if ckpt.has(name) else None

        layers = []
        for i in range(config.num_layers):
            attn = f"model.layers.{i}.self_attn"
            mlp = f"model.layers.{i}.mlp"
            qkv_names = [f"{attn}.{p}_proj.weight" for p in ("q", "k", "v")]
            gate_up_names = [f"{mlp}.{p}_proj.weight" for p in ("gate", "up")]
            layers.append(
                DecoderLayerWeights(
                    input_norm=place(ckpt.full(f"model.layers.{i}.input_layernorm.weight")),
                    qkv=place(torch.cat([rows(n) for n in qkv_names])),
                    qkv_bias=optional_rows([n.replace(".weight", ".bias") for n in qkv_names]),
                    o_proj=place(ckpt.columns(f"{attn}.o_proj.weight", tp_rank, tp_size)),
                    o_bias=optional_full(f"{attn}.o_proj.bias"),
                    post_norm=place(ckpt.full(f"model.layers.{i}.post_attention_layernorm.weight")),
                    gate_up=place(torch.cat([rows(n) for n in gate_up_names])),
                    gate_up_bias=optional_rows(
                        [n.replace(".weight", ".bias") for n in gate_up_names]
                    ),
                    down=place(ckpt.columns(f"{mlp}.down_proj.weight", tp_rank, tp_size)),
                    down_bias=optional_full(f"{mlp}.down_proj.bias"),
                )
            )
        embed = place(ckpt.full("model.embed_tokens.weight"))
        lm_head: torch.Tensor | None = None
        if tp_rank == 0:
            # Some tied checkpoints still store lm_head; others omit it even without the flag.
            if config.tie_word_embeddings or not ckpt.has("lm_head.weight"):
                lm_head = embed
            else:
                lm_head = place(ckpt.full("lm_head.weight"))
        return LlamaWeights(
            embed=embed,
            layers=layers,
            final_norm=place(ckpt.full("model.norm.weight")),
            lm_head=lm_head,
        )


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise NotFound(f"no *.safetensors files in {model_dir}", field="model_dir")
    return files


def _split_range(name: str, size: int, rank: int, world: int) -> tuple[int, int]:
    if size % world:
        raise InvalidArgument(
            f"{name}: dimension {size} is not divisible by tp_size={world}", field="tp_size"
        )
    part = size // world
    return rank * part, (rank + 1) * part
