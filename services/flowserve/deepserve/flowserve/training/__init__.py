"""LoRA fine-tuning on a pod (the train stage of fine-tuning jobs)."""
