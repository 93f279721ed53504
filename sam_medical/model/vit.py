"""The ViT families (``tiny``, ``vit_b``, ``vit_l``, ``vit_h``): construction, 256-native resizing of
official checkpoints, and the attention layers LoRA adapts.

All are :class:`segment_anything.modeling.Sam` instances made from ``segment_anything``'s own modules
(``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``), with the input size
``S`` as a parameter instead of the official registry's hard-coded 1024:

* the image encoder takes ``(B, 3, S, S)`` and returns ``(B, C, S/16, S/16)`` embeddings;
* the prompt encoder expects prompts in ``S``-pixel coordinates; the mask decoder returns ``S/4`` square
  low-resolution logits.

A checkpoint made at another size (the official ones are 1024) is adapted when it is loaded
(:func:`size_adapter`): the encoder's absolute position embedding ``(1, 64, 64, C)`` is resized
bicubically to ``(1, S/16, S/16, C)``, and the relative position tables of the *global*-attention
blocks ``(2*64-1, head_dim)`` linearly to ``(2*S/16-1, head_dim)`` (as ``segment_anything``'s own
``get_rel_pos`` would). Windowed blocks keep their tables (their window does not change).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from segment_anything.modeling import Sam

    from sam_medical.adapters.layer import LoRATarget

PATCH_SIZE = 16

# Values copied from segment_anything.build_sam (_build_sam and build_sam_vit_{b,l,h}).
_OFFICIAL_COMMON: dict[str, Any] = {
    "window_size": 14,
    "prompt_embed_dim": 256,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "iou_head_hidden_dim": 256,
    "mask_in_chans": 16,
    "pretrained_image_size": 1024,
}

#: Model name -> architecture. ``pretrained_image_size`` is the input size its weights were made at.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": {
        "encoder_embed_dim": 192,
        "encoder_depth": 4,
        "encoder_num_heads": 3,
        "encoder_global_attn_indexes": [1, 3],
        "window_size": 8,
        "prompt_embed_dim": 128,
        "decoder_depth": 2,
        "decoder_mlp_dim": 512,
        "decoder_num_heads": 4,
        "iou_head_hidden_dim": 128,
        "mask_in_chans": 16,
        "pretrained_image_size": 256,
    },
    "vit_b": {
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": [2, 5, 8, 11],
        **_OFFICIAL_COMMON,
    },
    "vit_l": {
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [5, 11, 17, 23],
        **_OFFICIAL_COMMON,
    },
    "vit_h": {
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [7, 15, 23, 31],
        **_OFFICIAL_COMMON,
    },
}


def construct_sam(arch: dict[str, Any], image_size: int) -> Sam:
    """A :class:`Sam` with ``arch``'s shapes for input size ``image_size`` (weights as initialised).

    The same construction as ``segment_anything.build_sam._build_sam``, with the input size and the
    prompt/decoder widths as parameters.
    """
    import torch  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)
    from segment_anything.modeling import (  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    embedding_size = image_size // PATCH_SIZE
    dim = arch["prompt_embed_dim"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch["encoder_depth"],
            embed_dim=arch["encoder_embed_dim"],
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch["encoder_num_heads"],
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(arch["encoder_global_attn_indexes"]),
            window_size=arch["window_size"],
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=arch["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=arch["decoder_mlp_dim"],
                num_heads=arch["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def construct_vit_family(name: str, image_size: int) -> Sam:
    """The registry's builder for the ViT families: random weights (ViT convention for the position
    embedding, which ``segment_anything`` leaves at zero)."""
    import torch  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)

    sam = construct_sam(ARCHITECTURES[name], image_size)
    torch.nn.init.trunc_normal_(sam.image_encoder.pos_embed, std=0.02)
    return sam


def vit_lora_targets(sam: Sam) -> list[LoRATarget]:
    """Every encoder block's attention: its fused ``qkv`` is ``dim -> 3*dim`` with q, k, v in thirds."""
    from sam_medical.adapters.layer import (
        LoRATarget,  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)
    )

    targets = []
    for block in sam.image_encoder.blocks:
        dim = int(block.attn.qkv.weight.shape[1])  # a Linear, or a LoRAQKV already in its place
        targets.append(LoRATarget(block.attn, range(0, dim), range(2 * dim, 3 * dim)))
    return targets


# --- checkpoint adaptation to the input size ---------------------------------------------------


def resize_pos_embed(pos_embed: torch.Tensor, size: int) -> torch.Tensor:
    """Absolute position embedding ``(1, a, a, C)`` -> ``(1, size, size, C)``, bicubic.

    Antialiased when shrinking (1024 -> 256 input: 64x64 -> 16x16), so that each new position averages
    the old ones it covers instead of sampling a few.
    """
    import torch.nn.functional as F  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)

    grid = pos_embed.detach().float().permute(0, 3, 1, 2)  # (1, C, a, a)
    out = F.interpolate(
        grid, size=(size, size), mode="bicubic", align_corners=False, antialias=size < grid.shape[-1]
    )
    return out.permute(0, 2, 3, 1).contiguous().to(pos_embed.dtype)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Relative position table ``(L, head_dim)`` -> ``(length, head_dim)``, linear.

    The same interpolation as ``segment_anything.modeling.image_encoder.get_rel_pos``.
    """
    import torch.nn.functional as F  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)

    t = table.detach().float().t().unsqueeze(0)  # (1, head_dim, L)
    out = F.interpolate(t, size=length, mode="linear", align_corners=False)
    return out[0].t().contiguous().to(table.dtype)


def global_rel_pos_keys(sam: Sam) -> set[str]:
    """State-dict names of the relative position tables of the global-attention encoder blocks."""
    keys = set()
    for i, block in enumerate(sam.image_encoder.blocks):
        if block.window_size == 0:
            keys |= {f"image_encoder.blocks.{i}.attn.rel_pos_h", f"image_encoder.blocks.{i}.attn.rel_pos_w"}
    return keys


def size_adapter(sam: Sam) -> Callable[[str, torch.Tensor, tuple[int, ...]], torch.Tensor | None]:
    """A function ``(key, value, want) -> value resized to want``, or None when ``key`` may not differ.

    Only the absolute position embedding and the global blocks' relative tables depend on the input size.
    """
    global_keys = global_rel_pos_keys(sam)

    def adapt(key: str, value: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor | None:
        have = tuple(value.shape)
        if (
            key == "image_encoder.pos_embed"
            and len(have) == 4
            and have[0] == 1
            and have[1] == have[2]
            and have[3] == want[3]
        ):
            return resize_pos_embed(value, want[1])
        if key in global_keys and len(have) == 2 and have[1] == want[1] and have[0] % 2 == 1:
            return resize_rel_pos(value, want[0])
        return None

    return adapt
