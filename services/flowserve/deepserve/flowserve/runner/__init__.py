"""Turns scheduled batches into forward passes: KV cache tensors, model runner, SPMD executors."""
