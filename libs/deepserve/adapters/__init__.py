"""LoRA adapters as models: PEFT's file format checked without torch, and adapter records."""
