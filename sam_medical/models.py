"""Build Segment Anything models: official ViT-B/L/H, and the small ``tiny`` and ``demo`` models.

All models are :class:`segment_anything.modeling.Sam` instances made from ``segment_anything``'s own
modules (``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``), with the input
size ``S`` (``image_size``) as a parameter instead of the registry's hard-coded 1024:

* the image encoder takes ``(B, 3, S, S)`` and returns ``(B, C, S/16, S/16)`` embeddings;
* the prompt encoder expects prompts in ``S``-pixel coordinates; the mask decoder returns ``S/4`` square
  low-resolution logits.

Running natively at ``S = 256`` is what makes the CPU usable (see the brief). A checkpoint made at
another size (the official ones are 1024) is adapted when it is loaded: the encoder's absolute position
embedding ``(1, 64, 64, C)`` is resized bicubically to ``(1, S/16, S/16, C)``, and the relative position
tables of the *global*-attention blocks ``(2*64-1, head_dim)`` linearly to ``(2*S/16-1, head_dim)``
(as ``segment_anything``'s own ``get_rel_pos`` would). Windowed blocks keep their tables (their window
does not change).

Weights never come silently from a random generator for the official models: either
``random_weights=True`` (seeded), or a checkpoint (explicit path, cached file or download, see
:mod:`sam_medical.checkpoints`). The ``tiny`` model is random by design unless a checkpoint is given;
``demo`` loads the committed file :data:`DEMO_ASSET`.
"""

from __future__ import annotations

import copy
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoints import OFFICIAL_CHECKPOINTS, md5_file, resolve_checkpoint
from .errors import UserInputError

if TYPE_CHECKING:  # torch is imported lazily so that the CLI answers --help at once
    import torch
    from segment_anything.modeling import Sam

MODEL_NAMES = ("tiny", "demo", "vit_b", "vit_l", "vit_h")

PATCH_SIZE = 16
#: The canvas the slices are stored on (:mod:`sam_medical.geometry`); prompts are given in its pixels.
CANVAS_SIZE = 256
#: Format tag of the full-model files written by :func:`save_full_model`.
FULL_MODEL_FORMAT = "sam-medical-model"
#: What users must be told about the ``demo`` model wherever it is served.
DEMO_NOTE = (
    "CPU demo model: a 4.6 M-parameter SAM-architecture model trained from scratch on CT phantoms "
    "(scripts/train_demo.py), NOT a foundation model. For real work use --conf model vit_b (downloads the "
    "official sam_vit_b_01ec64.pth once, MD5-checked) or --conf checkpoint /path/sam_vit_b_01ec64.pth"
)
#: Weights of the ``demo`` model (trained separately and committed to the repository).
DEMO_ASSET = Path(__file__).resolve().parent / "assets" / "demo_sam.pt"

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

TINY_CONFIG: dict[str, Any] = {
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
}

#: The demo model: the tiny family, wider (about 4.6 M parameters, 18.5 MB in float32).
DEMO_CONFIG: dict[str, Any] = {
    "encoder_embed_dim": 256,
    "encoder_depth": 4,
    "encoder_num_heads": 4,
    "encoder_global_attn_indexes": [1, 3],
    "window_size": 8,
    "prompt_embed_dim": 128,
    "decoder_depth": 2,
    "decoder_mlp_dim": 1024,
    "decoder_num_heads": 8,
    "iou_head_hidden_dim": 128,
    "mask_in_chans": 16,
    "pretrained_image_size": 256,
}

#: Model name -> architecture. ``pretrained_image_size`` is the input size its weights were made at.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": TINY_CONFIG,
    "demo": DEMO_CONFIG,
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


def check_model_name(name: str) -> str:
    if name not in MODEL_NAMES:
        raise UserInputError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return name


def check_image_size(image_size: int) -> int:
    """The model input size must be a multiple of 16 between 64 and 4096 (256 native, 1024 official)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise UserInputError(f"image size must be an integer, got {image_size!r}")
    if image_size % PATCH_SIZE or not 64 <= image_size <= 4096:
        raise UserInputError(f"image size must be a multiple of 16 between 64 and 4096, got {image_size}")
    return image_size


def model_image_size(sam: Sam) -> int:
    """The input size ``S`` the model was built for."""
    return int(sam.image_encoder.img_size)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def construct_sam(arch: dict[str, Any], image_size: int) -> Sam:
    """A :class:`Sam` with ``arch``'s shapes for input size ``image_size`` (weights as initialised).

    The same construction as ``segment_anything.build_sam._build_sam``, with the input size and the
    prompt/decoder widths as parameters.
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

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


def build_sam(
    name: str,
    *,
    image_size: int = 256,
    checkpoint: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[Sam, dict[str, Any]]:
    """Build model ``name`` for input size ``image_size``; return ``(sam, base_info)``.

    Args:
        name: one of :data:`MODEL_NAMES`.
        image_size: the encoder input ``S`` (256 native, 1024 as the official models); prompts and
            low-res masks follow (``S`` and ``S/4``).
        checkpoint: a weights file: an official SAM checkpoint (MD5-verified when it carries an official
            name), a plain or ``{"model": ...}`` state dict, or a file from :func:`save_full_model`.
        random_weights: seeded random weights instead of a checkpoint (never chosen silently for
            vit_b/l/h; ``tiny`` is always random unless a checkpoint is given).
        seed: seed of the random initialisation (the global RNG is left untouched).
        cache_dir, download: where official checkpoints are cached, and whether a missing one may be
            downloaded (see :func:`sam_medical.checkpoints.resolve_checkpoint`).

    Returns:
        The model, in eval mode on the CPU, and ``base_info``: ``{"name", "image_size", "checkpoint"
        (str or None), "checkpoint_md5" (or None), "random_weights", "seed"}``, which identifies the base
        model that LoRA adapters are made for.

    Raises:
        UserInputError: unknown name, bad size, missing/corrupt/mismatching checkpoint.
    """
    import torch

    check_model_name(name)
    check_image_size(image_size)
    if random_weights and checkpoint is not None:
        raise UserInputError("give either a checkpoint or random weights, not both")

    path: Path | None = None
    md5: str | None = None
    if not random_weights:
        if checkpoint is not None or name in OFFICIAL_CHECKPOINTS:
            path, md5 = resolve_checkpoint(name, checkpoint, cache_dir=cache_dir, download=download)
        elif name == "demo":
            if not DEMO_ASSET.is_file():
                raise UserInputError(
                    f"the demo model's weights {DEMO_ASSET} are not there (this copy of sam-medical has no "
                    "trained demo model); use --model tiny, an official model, or random weights"
                )
            path, md5 = DEMO_ASSET, md5_file(DEMO_ASSET)
        else:  # tiny: random by design
            random_weights = True

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = construct_sam(ARCHITECTURES[name], image_size)
        if random_weights:
            # ViT convention; segment_anything leaves the absolute position embedding at zero.
            torch.nn.init.trunc_normal_(sam.image_encoder.pos_embed, std=0.02)
    if path is not None:
        load_weights(sam, path, name)
    sam.eval()
    base_info = {
        "name": name,
        "image_size": image_size,
        "checkpoint": str(path) if path is not None else None,
        "checkpoint_md5": md5,
        "random_weights": bool(random_weights),
        "seed": int(seed),
    }
    return sam, base_info


# --- checkpoint reading and adaptation ----------------------------------------------------------


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def read_state_dict(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """Read a model state dict from ``path`` with ``torch.load(weights_only=True)``.

    Accepts a plain state dict, ``{"model": sd}`` / ``{"state_dict": sd}``, or a :func:`save_full_model`
    file (whose model name must be ``name``). A ``module.`` prefix (DistributedDataParallel) is removed.

    Raises:
        UserInputError: unreadable, truncated or corrupt file; an adapter file; not a state dict.
    """
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip errors, unpickling errors, EOF: all mean "not a usable file"
        raise UserInputError(
            f"checkpoint {path} could not be read; it is corrupt, truncated or not a PyTorch weights file "
            f"({_short_error(exc)})"
        ) from exc
    if isinstance(obj, dict) and obj.get("format") == "sam-medical-adapter":
        raise UserInputError(f"{path} is a LoRA adapter, not a model checkpoint; load it as an adapter")
    if isinstance(obj, dict) and obj.get("format") == FULL_MODEL_FORMAT:
        saved_name = (obj.get("config") or {}).get("name")
        if saved_name != name:
            raise UserInputError(f"checkpoint {path} holds a {saved_name} model, not {name}")
        obj = obj.get("model")
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise UserInputError(f"checkpoint {path} does not hold a model state dict (names -> tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def resize_pos_embed(pos_embed: torch.Tensor, size: int) -> torch.Tensor:
    """Absolute position embedding ``(1, a, a, C)`` -> ``(1, size, size, C)``, bicubic.

    Antialiased when shrinking (1024 -> 256 input: 64x64 -> 16x16), so that each new position averages
    the old ones it covers instead of sampling a few.
    """
    import torch.nn.functional as F

    grid = pos_embed.detach().float().permute(0, 3, 1, 2)  # (1, C, a, a)
    out = F.interpolate(
        grid, size=(size, size), mode="bicubic", align_corners=False, antialias=size < grid.shape[-1]
    )
    return out.permute(0, 2, 3, 1).contiguous().to(pos_embed.dtype)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Relative position table ``(L, head_dim)`` -> ``(length, head_dim)``, linear.

    The same interpolation as ``segment_anything.modeling.image_encoder.get_rel_pos``.
    """
    import torch.nn.functional as F

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


def adapt_state_dict(
    sam: Sam, state: dict[str, torch.Tensor], name: str, source: str | os.PathLike = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Check ``state`` against ``sam``'s keys and shapes, resizing position embeddings for its input size.

    Only ``image_encoder.pos_embed`` and the global blocks' ``rel_pos_h/w`` may differ in spatial size;
    every other difference is an error.

    Raises:
        UserInputError: ``"checkpoint X is not a SAM vit_b checkpoint: 12 missing keys e.g. ...; ..."``.
    """
    target = sam.state_dict()
    global_keys = global_rel_pos_keys(sam)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target:
            continue
        want = tuple(target[key].shape)
        have = tuple(value.shape)
        if have == want:
            out[key] = value
        elif (
            key == "image_encoder.pos_embed"
            and len(have) == 4
            and have[0] == 1
            and have[1] == have[2]
            and have[3] == want[3]
        ):
            out[key] = resize_pos_embed(value, want[1])
        elif key in global_keys and len(have) == 2 and have[1] == want[1] and have[0] % 2 == 1:
            out[key] = resize_rel_pos(value, want[0])
        else:
            mismatched.append(f"{key} {list(have)} (model {list(want)})")
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            problems.append(f"{len(items)} {label} e.g. {', '.join(items[:3])}")
    if problems:
        raise UserInputError(f"checkpoint {source} is not a SAM {name} checkpoint: {'; '.join(problems)}")
    return out


def load_weights(sam: Sam, path: str | os.PathLike, name: str) -> None:
    """Load the checkpoint at ``path`` into ``sam`` (checked, resized to its input size, strict)."""
    import torch

    state = adapt_state_dict(sam, read_state_dict(path, name), name, path)
    with torch.no_grad():
        sam.load_state_dict(state, strict=True)


# --- full-model files ---------------------------------------------------------------------------


def _plain_info(info: dict[str, Any]) -> dict[str, Any]:
    """``base_info`` with values that ``torch.load(weights_only=True)`` accepts."""
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, os.PathLike):
            v = str(v)
        if v is not None and not isinstance(v, str | int | float | bool):
            raise TypeError(f"base_info[{k!r}] = {v!r} cannot be stored")
        out[str(k)] = v
    return out


def save_full_model(
    sam: Sam, path: str | os.PathLike, base_info: dict[str, Any], *, half: bool = False
) -> Path:
    """Write the whole model (LoRA folded in, if injected) to ``path``, atomically.

    File: ``{"format": "sam-medical-model", "format_version": 1, "config": {"name", "image_size",
    "architecture"}, "base_info": {...}, "model": state_dict}``, loadable with ``weights_only=True`` and
    by ``build_sam(name, checkpoint=path)`` (at any input size). ``half`` stores float tensors as
    float16 (half the size; they are cast back when loaded).
    """
    import torch

    from .atomic import atomic_path
    from .lora import base_state_dict

    name = base_info["name"]
    state = {}
    for k, v in base_state_dict(sam).items():
        v = v.detach().cpu().clone()
        state[k] = v.half() if half and v.is_floating_point() else v
    obj = {
        "format": FULL_MODEL_FORMAT,
        "format_version": 1,
        "config": {
            "name": name,
            "image_size": model_image_size(sam),
            "architecture": copy.deepcopy(ARCHITECTURES.get(name)),
        },
        "base_info": _plain_info(base_info),
        "model": state,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path
