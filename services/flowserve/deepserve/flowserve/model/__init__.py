"""FlowServe's own Llama-family model code, written for a paged KV cache."""

from deepserve.flowserve.model.config import ModelConfig, RopeScaling
from deepserve.flowserve.model.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM", "ModelConfig", "RopeScaling"]
