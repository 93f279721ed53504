"""The app's settings, read from ``monailabel start_server ... --conf KEY VALUE`` (all values are strings).

Not a MONAI Label ``TaskConfig``: ``main.py`` wires the tasks (``sam_2d``, ``sam_3d``, ``sam_lora``) itself,
and every task reads its settings from the one :class:`SamAppConfig` parsed here.

| key | default | meaning |
|---|---|---|
| ``model`` | ``medsam_lite`` | ``medsam_lite`` (LiteMedSAM, packaged), ``tiny`` (random, tests), ``vit_b``, ``vit_l`` or ``vit_h`` |
| ``checkpoint`` | none | a weights file; medsam_lite uses the packaged file (SHA-256-checked); for vit_b/l/h without it, the official file is downloaded once into ``<app>/model/`` and MD5-checked |
| ``use_pretrained_model`` | ``true`` | ``false``: seeded random weights (``/info/`` says so) |
| ``seed`` | ``0`` | seed of random weights (adapters are tied to it) |
| ``image_size`` | ``256`` | model input size (256 native, 1024 as the official models) |
| ``device`` | ``auto`` | ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` |
| ``window`` | ``auto`` | ``auto`` (CT abdomen window or MR percentiles), ``ct``, ``mr``, a preset or ``L,W`` |
| ``adapter`` | (follow) | a version id to select at start (roll back), or ``none`` for the base model |
| ``embedding_cache_mb`` | ``512`` | memory for cached slice embeddings |
| ``volume_cache_mb`` | ``2048`` | memory for loaded volumes |
| ``prefetch_slices`` | ``4`` | neighbouring slices encoded first in the background after a click; then the rest of the opened volume, centre outwards, within ``embedding_cache_mb`` (0: no background encoding at all); a click stops a background encode in flight |
| ``torch_threads`` | ``0`` | intra-op threads of the serving thread and of the ONNX Runtime / OpenVINO sessions (0: half the CPU cores); background encodes use 1 |
| ``runtime`` | ``auto`` | what runs the model for clicks: ``torch``, ``onnx`` (ONNX Runtime, CPU), ``openvino`` (OpenVINO encoder, optional extra), or ``auto`` (``onnx`` on the CPU, ``torch`` on CUDA); exports are verified against PyTorch and cached by digest |
| ``precision`` | ``fp32`` | ``fp16`` or ``bf16``: autocast of runtime ``torch`` on CUDA only (not measured; fails agreement on the CPU) |
| ``export_dir`` | ``<app>/model/exports`` | cache of the ONNX exports (one folder per weights digest, adapter and versions) |
| ``multimask`` | ``model`` | ``auto``: for a single click, best of SAM's three masks by predicted IoU; ``false``: the single-mask output; ``model``: ``auto`` for weights trained with clicks (SAM; adapters trained with ``click_rounds``, whose IoU head was trained), ``false`` otherwise |
| ``click_strategy`` | ``auto`` | how clicks are answered: ``click_to_box`` (boxes placed around the clicks, for a model trained with boxes only), ``direct`` (the clicks go to the decoder), ``auto`` (what the served weights were trained with: the registry's ``trained_prompts``, or the adapter's) |
| ``labels`` | (datastore) | label names shown in Slicer: ``liver,spleen`` (values 1, 2, ...) or ``liver=1,kidney=3``; default: the datastore's (``labels.json`` beside the studies, else the names its saved labels' info records), else ``object`` |
| ``max_points`` | ``64`` | most foreground + background points accepted in one request (1..10000) |
| every option of ``sam_lora``'s table (``epochs``, ``learning_rate``, ``lora_rank``, ...) | ``sam-medical train``'s | training defaults (a train request may override them), with the same bounds: the options and the measured recipe are declared once in :mod:`sam_medical.training.config` (:func:`~sam_medical.training.config.app_options`; ``lora_rank`` 0 with ``train_decoder``: the mask decoder alone, on cached embeddings) |
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sam_medical.errors import UserInputError
from sam_medical.inference.engines import check_precision, check_runtime
from sam_medical.inference.strategies import check_click_strategy
from sam_medical.model.build import build_sam
from sam_medical.model.registry import DEFAULT_MODEL, MODEL_NAMES, check_image_size
from sam_medical.prompts import check_prompt_mode
from sam_medical.training.config import AppOption, app_options
from sam_medical.volume.intensity import window_options
from sam_medical.volume.label_names import check_label_names, datastore_label_names

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise UserInputError(f"{name} must be true or false, got {value!r}")


def as_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` (an int, or a string/float holding a whole number) as an int in ``[minimum, maximum]``."""
    if isinstance(value, bool):
        raise UserInputError(f"{name} must be an integer, got {value!r}")
    try:
        number = float(str(value).strip())
        out = int(number)
        if out != number:
            raise ValueError
    except (ValueError, OverflowError):
        raise UserInputError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise UserInputError(f"{name} must be >= {minimum}, got {out}")
    if maximum is not None and out > maximum:
        raise UserInputError(f"{name} must be <= {maximum}, got {out}")
    return out


def as_float(value: Any, name: str, positive: bool = False) -> float:
    """``value`` as a finite float (``positive``: also > 0)."""
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserInputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out) or (positive and out <= 0):
        raise UserInputError(f"{name} must be a {'positive' if positive else 'finite'} number, got {value!r}")
    return out


def first(value: Any) -> Any:
    """Slicer sends the first element of list-valued options; a JSON client may send the list."""
    return value[0] if isinstance(value, list) and value else value


def parse_train_option(opt: AppOption, value: Any, name: str | None = None) -> Any:
    """A training option of the app (``--conf`` or a request) as its ``TrainConfig`` value, within the
    bounds declared in :mod:`sam_medical.training.config`.

    Raises:
        UserInputError: naming the option (``name``, default its key) and what it accepts.
    """
    name, value = name or opt.key, first(value)
    if opt.kind is bool:
        return as_bool(value, name)
    if opt.choices:
        return check_prompt_mode(str(value), name) if opt.field == "prompt" else _choice(opt, value, name)
    if opt.kind is int:
        out: Any = as_int(value, name, opt.low, maximum=opt.high)  # type: ignore[arg-type]
    elif opt.kind is float:
        out = as_float(value, name, positive=opt.low_open and opt.low == 0)
        if opt.low is not None and not opt.low_open and (out < opt.low or opt.high_open and out >= opt.high):
            close = ")" if opt.high_open else "]"
            raise UserInputError(f"{name} must be in [{opt.low:g}, {opt.high:g}{close}, got {out}")
        if opt.high is not None and out > opt.high:
            raise UserInputError(f"{name} must be at most {opt.high}, got {out}")
    else:
        out = str(value)
    return None if opt.zero_is_none and out == 0 else out


def _choice(opt: AppOption, value: Any, name: str) -> str:
    if str(value) not in (opt.choices or ()):
        raise UserInputError(f"{name} must be one of {', '.join(opt.choices or ())}, got {value!r}")
    return str(value)


def train_defaults(conf: dict[str, Any]) -> dict[str, Any]:
    """``{TrainConfig field: value}``: each option of the app's training table from ``--conf`` (its key)
    when given, else its declared default."""
    return {
        o.field: parse_train_option(o, conf[o.key], f"--conf {o.key}") if o.key in conf else o.default
        for o in app_options()
    }


@dataclass(frozen=True)
class SamAppConfig:
    """Validated app settings (see the module docstring)."""

    app_dir: str
    model: str = DEFAULT_MODEL
    checkpoint: str | None = None
    use_pretrained_model: bool = True
    seed: int = 0
    image_size: int = 256
    device: str = "auto"
    window: str = "auto"
    adapter: str | None = None
    embedding_cache_mb: int = 512
    volume_cache_mb: int = 2048
    prefetch_slices: int = 4
    torch_threads: int = 0
    runtime: str = "auto"
    precision: str = "fp32"
    export_dir: str | None = None
    multimask: str = "model"
    click_strategy: str = "auto"
    #: ``{name: value}`` (MONAI Label's ``labels``): the segment names Slicer offers, and the value each
    #: has in the datastore's label maps.
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    #: Where ``labels`` came from: ``conf``, ``datastore`` or ``default``; and what was ignored there.
    labels_source: str = "default"
    labels_notes: tuple[str, ...] = ()
    max_points: int = 64
    #: ``{TrainConfig field: value}``: the defaults of ``sam_lora``'s options (:func:`train_defaults`)
    train_defaults: dict[str, Any] = field(default_factory=lambda: train_defaults({}))

    @property
    def model_dir(self) -> Path:
        """``<app>/model``: official checkpoints, adapter versions, training runs."""
        return Path(self.app_dir) / "model"

    @property
    def exports_dir(self) -> Path:
        """Where ONNX exports are cached: ``export_dir``, or ``<app>/model/exports``."""
        return Path(self.export_dir) if self.export_dir else self.model_dir / "exports"

    @property
    def random_weights(self) -> bool:
        """Seeded random weights: asked for, or the ``tiny`` model (random by design) without checkpoint."""
        return (not self.use_pretrained_model) or (self.model == "tiny" and not self.checkpoint)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels_notes"] = list(self.labels_notes)
        return d

    def label_value(self, name: Any) -> int:
        """The value of segment ``name`` in the label maps; a name the app does not know gets the first
        value after the known ones (so it never reads as another organ)."""
        if isinstance(name, str) and name in self.labels:
            return self.labels[name]
        return min(max(self.labels.values(), default=0) + 1, 255)

    @classmethod
    def from_conf(
        cls, app_dir: str | os.PathLike, conf: dict[str, Any] | None, studies: str | os.PathLike | None = None
    ) -> SamAppConfig:
        """Parse ``--conf`` pairs; unknown keys are ignored (MONAI Label passes its own too).

        ``studies``: the datastore folder; without ``--conf labels``, its label names are the labels
        (:func:`sam_medical.volume.label_names.datastore_label_names`).

        Raises:
            UserInputError: a value that cannot be used, with the accepted values.
        """
        c = {str(k): v for k, v in (conf or {}).items()}
        device = str(c.get("device", "auto")).strip().lower()
        if device not in ("auto", "cpu", "cuda") and not (
            device.startswith("cuda:") and device[5:].isdigit()
        ):
            raise UserInputError(f"--conf device must be auto, cpu, cuda or cuda:N, got {device!r}")
        window = str(c.get("window", "auto")).strip()
        window_options(window)  # validates
        adapter = c.get("adapter")
        adapter = str(adapter).strip() if adapter not in (None, "") else None
        multimask = str(c.get("multimask", "model")).strip().lower()
        if multimask not in ("model", "false", "auto"):
            raise UserInputError(f"--conf multimask must be model, false or auto, got {multimask!r}")
        labels, source, notes = app_labels(c.get("labels"), studies)
        return cls(
            app_dir=str(Path(app_dir).resolve()),
            **_model_conf(c),
            device=device,
            window=window,
            adapter=adapter,
            embedding_cache_mb=as_int(c.get("embedding_cache_mb", 512), "--conf embedding_cache_mb", 0),
            volume_cache_mb=as_int(c.get("volume_cache_mb", 2048), "--conf volume_cache_mb", 0),
            prefetch_slices=as_int(c.get("prefetch_slices", 4), "--conf prefetch_slices", 0),
            torch_threads=as_int(c.get("torch_threads", 0), "--conf torch_threads", 0),
            runtime=check_runtime(c.get("runtime", "auto"), "--conf runtime"),
            precision=check_precision(c.get("precision", "fp32"), "--conf precision"),
            export_dir=_resolved(c.get("export_dir")),
            multimask=multimask,
            click_strategy=check_click_strategy(c.get("click_strategy", "auto"), "--conf click_strategy"),
            labels=labels,
            labels_source=source,
            labels_notes=tuple(notes),
            max_points=as_int(c.get("max_points", 64), "--conf max_points", 1, maximum=10_000),
            train_defaults=train_defaults(c),
        )


def _resolved(path: Any) -> str | None:
    """An absolute path (``~`` expanded), or None for an empty setting."""
    return str(Path(str(path)).expanduser().resolve()) if path else None


def _model_conf(c: dict[str, Any]) -> dict[str, Any]:
    """``model``, ``checkpoint``, ``use_pretrained_model``, ``image_size`` and ``seed`` from ``--conf``."""
    model = str(c.get("model", DEFAULT_MODEL)).strip()
    if model not in MODEL_NAMES:
        raise UserInputError(f"--conf model {model!r} is unknown; choose one of {', '.join(MODEL_NAMES)}")
    checkpoint = _resolved(c.get("checkpoint"))
    use_pretrained = as_bool(c.get("use_pretrained_model", "true"), "--conf use_pretrained_model")
    if checkpoint and not use_pretrained:
        raise UserInputError("--conf checkpoint and --conf use_pretrained_model false exclude each other")
    return {
        "model": model,
        "checkpoint": checkpoint,
        "use_pretrained_model": use_pretrained,
        "image_size": check_image_size(as_int(c.get("image_size", 256), "--conf image_size"), model),
        "seed": as_int(c.get("seed", 0), "--conf seed", 0),
    }


DEFAULT_LABELS: dict[str, int] = {"object": 1}


def parse_conf_labels(text: str) -> dict[str, int]:
    """``--conf labels``: ``liver,spleen`` (values 1, 2, ... in order) or ``liver=1,kidney=3``.

    Raises:
        UserInputError: an empty list, a bad name or value, a value given twice.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserInputError("--conf labels is empty; give names, e.g. liver,spleen or liver=1,kidney=3")
    mapping: dict[str, Any] = {}
    for pos, item in enumerate(items, start=1):
        name, sep, value = item.partition("=")
        mapping[name.strip()] = as_int(value, f"--conf labels value of {name.strip()!r}") if sep else pos
    return check_label_names(mapping, "--conf labels")


def app_labels(conf_value: Any, studies: str | os.PathLike | None) -> tuple[dict[str, int], str, list[str]]:
    """``(labels, source, notes)``: ``--conf labels`` when given, else the datastore's label names (a local
    ``studies`` folder), else ``{"object": 1}``."""
    if conf_value not in (None, ""):
        return parse_conf_labels(str(conf_value)), "conf", []
    if (
        studies is not None
        and not str(studies).startswith(("http://", "https://"))
        and Path(studies).is_dir()
    ):
        names, notes = datastore_label_names(studies)
        if names:
            return names, "datastore", notes
    return dict(DEFAULT_LABELS), "default", []


def build_base_model(cfg: SamAppConfig) -> tuple[Any, dict[str, Any]]:
    """The base SAM these settings describe (``(Sam, base_info)``): one place for server and trainer.

    Official checkpoints are looked up, or downloaded once and MD5-checked, in the app's model folder.
    """
    return build_sam(
        cfg.model,
        image_size=cfg.image_size,
        checkpoint=cfg.checkpoint,
        random_weights=not cfg.use_pretrained_model,
        seed=cfg.seed,
        cache_dir=cfg.model_dir,
        download=True,
    )
