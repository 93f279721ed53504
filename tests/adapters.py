"""Test helper: small LoRA adapter files for the ``tiny`` model."""

from __future__ import annotations

from pathlib import Path


def save_tiny_adapter(
    path: Path, *, rank: int = 2, model_seed: int = 0, lora_seed: int = 0, nonzero_b: bool = False
) -> dict:
    """Write an adapter of the seeded ``tiny`` model (input 256, all 4 blocks) and return its metadata.

    ``nonzero_b`` fills the LoRA B matrices with seeded noise, so that the adapter changes the outputs
    (a fresh adapter, B = 0, reproduces the base model exactly).
    """
    import torch

    from sam_medical.adapters.inject import inject_lora
    from sam_medical.adapters.save_and_load import save_adapter
    from sam_medical.model.build import build_sam

    sam, base_info = build_sam("tiny", image_size=256, seed=model_seed)
    inject_lora(sam, rank=rank, seed=lora_seed)
    if nonzero_b:
        g = torch.Generator().manual_seed(lora_seed + 100)
        with torch.no_grad():
            for name, p in sam.named_parameters():
                if "lora_" in name and name.endswith("_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(
        sam,
        path,
        base_info=base_info,
        rank=rank,
        alpha=None,
        blocks=list(range(4)),
        image_size=256,
        train_decoder=False,
    )
