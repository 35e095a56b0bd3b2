"""Turns step plans into forward passes: KV cache tensors, model runner, SPMD executors."""
