"""Train task: ``sam_lora`` (LoRA fine-tuning on the datastore's final labels, published as a new version)."""
