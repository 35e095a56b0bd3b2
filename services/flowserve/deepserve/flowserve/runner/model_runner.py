"""One rank's model plus its KV cache: executes StepPlans and returns logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.lora.batched_matmul import LoRAStep
from deepserve.flowserve.lora.host_weights import AdapterWeights
from deepserve.flowserve.lora.layout import projection_shapes
from deepserve.flowserve.lora.slots import LoRASlots
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.llama import LlamaForCausalLM
from deepserve.flowserve.runner.device import parse_dtype, platform_of
from deepserve.flowserve.runner.inputs import build_model_inputs, validate_plan
from deepserve.flowserve.runner.kv_cache_tensors import KVCacheTensors


class ModelRunner:
    """Loads one rank's weight shard, owns its paged KV cache, and runs forward steps."""

    def __init__(
        self,
        model_dir: str | Path,
        device: torch.device | str,
        dtype: torch.dtype | str | None,
        num_blocks: int,
        block_size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype, platform_of(self.device))
        self.config = ModelConfig.from_model_dir(model_dir)
        self.config.check_tensor_parallel(tp_size)
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.block_size = block_size
        self.model = LlamaForCausalLM.load(
            model_dir,
            self.config,
            device=self.device,
            dtype=self.dtype,
            tp_rank=tp_rank,
            tp_size=tp_size,
            tp_group=tp_group,
        )
        # Called on the forward thread as (plan, layer index, KV cache) after each layer has
        # written its KV: the layer-by-layer KV transfer taps it.
        self.after_layer: Callable[[StepPlan, int, KVCacheTensors], None] | None = None
        self.kv_cache = KVCacheTensors(
            num_layers=self.config.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=self.config.num_kv_heads // tp_size,
            head_dim=self.config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        # LoRA adapter slots, allocated by the first adapter load.
        self.lora_slots: LoRASlots | None = None

    def load_adapter(
        self, slot: int, weights: AdapterWeights, *, num_slots: int, max_rank: int
    ) -> None:
        """Copy an adapter's host weights into a device slot (allocating the slots once)."""
        if self.tp_size > 1:
            raise NotImplementedError("LoRA adapters are served without tensor parallelism")
        if self.lora_slots is None:
            config = self.config
            self.lora_slots = LoRASlots(
                projection_shapes(
                    config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
                ),
                num_layers=config.num_layers,
                num_slots=num_slots,
                max_rank=max_rank,
                device=self.device,
                dtype=self.dtype,
            )
        self.lora_slots.write(slot, weights)

    def _lora_step(self, plan: StepPlan) -> LoRAStep | None:
        if self.lora_slots is None or all(s.adapter_slot < 0 for s in plan.sequences):
            return None
        token_slots = [s.adapter_slot for s in plan.sequences for _ in s.token_ids]
        return LoRAStep(self.lora_slots, token_slots, self.device, self.dtype)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def computes_logits(self) -> bool:
        return self.tp_rank == 0

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run the step, return float32 logits [needs_logits seqs, vocab] on the device.

        They stay there: the sampler runs where they are, and on an accelerator only the token
        ids and logprobs it picks come to the host (a [batch, vocab] copy per step would not).

        Rows follow plan order. Ranks other than 0 run the same layers (their all-reduces are
        needed) but skip lm_head and return an empty [0, vocab] tensor.
        """
        validate_plan(plan, num_blocks=self.num_blocks, block_size=self.block_size)
        empty = torch.empty(0, self.config.vocab_size, dtype=torch.float32)
        if plan.is_empty:
            return empty
        inputs = build_model_inputs(
            plan,
            block_size=self.block_size,
            device=self.device,
            fused_decode=self.model.fused_decode,
            fused_prefill=self.model.fused_prefill,
        )
        hidden = self.model.forward(
            inputs.token_ids,
            inputs.positions,
            inputs.attention,
            self.kv_cache.layers,
            max_position=inputs.max_position,
            after_layer=self._layer_hook(plan),
            lora=self._lora_step(plan),
        )
        if not self.computes_logits or inputs.logits_indices.numel() == 0:
            return empty
        logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))
        return logits.float()

    def _layer_hook(self, plan: StepPlan) -> Callable[[int], None] | None:
        hook = self.after_layer
        if hook is None:
            return None
        kv_cache = self.kv_cache
        return lambda layer: hook(plan, layer, kv_cache)

    def copy_to_host(self, block_ids: Sequence[int]) -> torch.Tensor:
        """This rank's KV of the blocks, [layers, 2, blocks, block_size, kv_heads/tp, head_dim]."""
        return self.kv_cache.copy_to_host(block_ids)

    def load_from_host(self, block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        self.kv_cache.load_from_host(block_ids, tensor)
