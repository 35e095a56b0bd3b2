"""Fine-tuning jobs: preprocess -> train (LoRA on a pod) -> evaluate -> register the model."""
