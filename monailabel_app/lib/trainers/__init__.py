"""Train task: ``sam_lora`` (fine-tunes the mask decoder and, with lora_rank > 0, LoRA adapters on the encoder's q and v, on the datastore's final labels; published as a new version)."""
