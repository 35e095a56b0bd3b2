"""Multi-LoRA serving: adapter weights on the host, device slots, and the batched LoRA matmuls."""
