"""The settings of a training run, declared once: :class:`TrainConfig`.

A run fine-tunes SAM's mask decoder and, with ``lora_rank`` > 0, LoRA adapters on q and v of the image
encoder's attention. Each field carries its help text, its group, its command-line flag and its place in
the MONAI Label app in its metadata, so that everything else is generated from here:

* ``sam-medical train``'s options (:func:`add_arguments`, :func:`from_args`);
* what ``sam-medical describe`` reports as what will be trained (:func:`add_arguments` with ``only``);
* the app's ``sam_lora`` option table, with bounds (:func:`app_options`), and the ``TrainConfig`` it
  builds from a request (the offered options plus the fields the app sets itself, :data:`APP_SETS`).

Adding an option is adding a field here. The defaults are the recipe measured on real CT (README,
"Fine-tuning recipe"), not guesses.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sam_medical.errors import UserInputError
from sam_medical.model.registry import DEFAULT_MODEL, MODEL_NAMES
from sam_medical.prompts import PROMPT_MODES, check_prompt_mode

#: SAMed's loss weights (0.8 Dice + 0.2 cross-entropy).
LAMBDA_DICE = 0.8
LAMBDA_CE = 0.2
DEVICE_HELP = "auto | cpu | cuda | cuda:N"
#: Values of ``precision``: the autocast dtype of a run on CUDA.
AMP_PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class App:
    """How the MONAI Label app's ``sam_lora`` offers a field in its option table (Slicer's, or the JSON
    body of ``POST /train/sam_lora``), and ``--conf`` sets its default.

    ``low``/``high``: the bounds (inclusive unless ``low_open``/``high_open``); they keep one request from
    taking the machine (``lora_rank=1000000`` once grew the training process to 20.6 GB).
    """

    key: str | None = None  #: the request and ``--conf`` key (default: the field name)
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    default: Any = None  #: the app's default when it differs from the CLI's (None: the same)
    zero_is_none: bool = False  #: 0 in a request means None (no cap, all items)


#: The fields the app sets itself, not offered in its option table: from its ``--conf`` settings (model,
#: weights, device, seed), its own folders (data, run folder, weights cache), the served adapter
#: (``adapter_init``), or left at the CLI's default because a Slicer user has no use for them.
APP_SETS = "set by the app"


def _opt(
    default: Any, help: str, group: str, *, flag: str | None = None, app: App | str = APP_SETS, **kw: Any
) -> Any:
    """A dataclass field with its metadata: ``help``, ``group``, ``flag`` (None: from the name; "": none),
    ``app`` (an :class:`App`: offered in the app's table; else :data:`APP_SETS`) and argparse extras
    (``choices``, ``metavar``, ``list_of_int``, ``negate``)."""
    meta = {"help": help, "group": group, "flag": flag, "app": app, **kw}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


DATA, MODEL, PROMPTS, OPTIM, RUN = "data and output", "model", "prompts", "optimisation", "running"


@dataclass
class TrainConfig:
    """Everything a training run depends on (the options of ``sam-medical train``; see each field's help).

    ``warmup_steps=None`` means 5% of the run's optimiser steps. ``max_steps`` caps the optimiser steps
    of the whole run (the schedule is laid out over ``min(max_steps, epochs * steps_per_epoch)``).
    ``val_fraction=0`` validates on the training cases (reported as ``val_on_train``).
    """

    data: str = _opt("", "folder of .npz slice files (from `sam-medical preprocess`)", DATA, required=True)
    out: str = _opt(
        "", "run folder (created; one run per folder: see --resume, --overwrite)", DATA, required=True
    )
    label_values: list[int] | None = _opt(
        None, "label values to train on (default: every label)", DATA, flag="--labels", list_of_int=True
    )
    val_fraction: float = _opt(
        0.2,
        "fraction of volumes held out for validation (0: validate on training)",
        DATA,
        app=App(low=0.0, high=1.0, high_open=True),
    )
    val_max_items: int | None = _opt(
        None,
        "validate on at most this many items, evenly spaced",
        DATA,
        app=App(low=0, high=100_000, default=200, zero_is_none=True),
    )
    model: str = _opt(
        DEFAULT_MODEL,
        f"model family ({DEFAULT_MODEL}: LiteMedSAM, packaged and SHA-256-checked; tiny: random weights, tests)",
        MODEL,
        choices=MODEL_NAMES,
    )
    checkpoint: str | None = _opt(None, "weights file (official SAM checkpoints are MD5-checked)", MODEL)
    random_weights: bool = _opt(False, "seeded random weights (tests, benchmarks)", MODEL)
    image_size: int = _opt(256, "model input size: 256 (native, fast) or 1024 (ViT SAM only)", MODEL)
    cache_dir: str | None = _opt(None, "where official SAM checkpoints are cached", MODEL)
    download: bool = _opt(
        True, "download a missing official SAM checkpoint", MODEL, flag="--no-download", negate=True
    )
    lora_rank: int = _opt(
        0,
        "LoRA rank on q and v of the encoder's attention (0: no LoRA; the default recipe trains the mask "
        "decoder on cached embeddings, which measured better per CPU minute: README, 'Fine-tuning recipe')",
        MODEL,
        app=App(low=0, high=64),
    )
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: the rank, i.e. scale 1)", MODEL)
    lora_blocks: list[int] | None = _opt(
        None, "attention blocks to adapt, e.g. 0,1,2 (default: all)", MODEL, list_of_int=True
    )
    train_decoder: bool = _opt(
        True, "train the mask decoder (--no-train-decoder: LoRA alone)", MODEL, app=App()
    )
    adapter_init: str | None = _opt(None, "start from this adapter (same base model and rank)", MODEL)
    prompt: str = _opt(
        "mixed",
        "training prompts: one kind, or mixed (box and clicks, one dropped at random)",
        PROMPTS,
        choices=PROMPT_MODES,
        app=App(),
    )
    num_points: int = _opt(3, "up to this many foreground clicks per item", PROMPTS)
    num_bg_points: int = _opt(1, "up to this many background clicks per item", PROMPTS)
    box_jitter: int = _opt(5, "box sides move by 0..N canvas pixels (MedSAM: 5 at 256)", PROMPTS)
    drop_prob: float = _opt(0.5, "mixed prompts: probability of dropping the box or the clicks", PROMPTS)
    click_rounds: int = _opt(
        0,
        "interactive training as SAM trains: prompt rounds per item, a jittered box or one click, then clicks in "
        "the last mask's error region with its logits fed back (0: the fixed prompts of --prompt)",
        PROMPTS,
        app=App(low=0, high=32),
    )
    first_click_prob: float = _opt(
        0.5, "click rounds: probability that the first prompt is one click (else a jittered box)", PROMPTS
    )
    epochs: int = _opt(10, "passes over the training items", OPTIM, app=App(low=1, high=1000))
    max_steps: int | None = _opt(
        100,
        "stop after this many optimiser steps (0: no cap; the recipe's 100 overfit less than 200 on real CT)",
        OPTIM,
        app=App(low=0, high=1_000_000, zero_is_none=True),
    )
    batch_size: int = _opt(8, "items per micro-batch", OPTIM, app=App(low=1, high=64))
    grad_accum: int = _opt(1, "micro-batches per optimiser step", OPTIM)
    lr: float = _opt(
        1e-4,
        "peak learning rate (AdamW; warm-up then cosine decay)",
        OPTIM,
        app=App(key="learning_rate", low=0.0, low_open=True, high=1.0),
    )
    weight_decay: float = _opt(0.01, "AdamW weight decay", OPTIM)
    warmup_steps: int | None = _opt(None, "linear warm-up steps (default: 5%% of the run)", OPTIM)
    dice_weight: float = _opt(LAMBDA_DICE, "weight of the Dice loss", OPTIM)
    ce_weight: float = _opt(LAMBDA_CE, "weight of the binary cross-entropy loss", OPTIM)
    iou_weight: float = _opt(1.0, "click rounds: weight of the IoU head's squared error", OPTIM)
    seed: int = _opt(0, "seed of the split, the prompts and the LoRA initialisation", OPTIM)
    device: str = _opt("auto", DEVICE_HELP, RUN)
    precision: str = _opt(
        "auto",
        "autocast on CUDA: auto (bf16 where supported, else fp16), bf16, fp16 or fp32 (none); the CPU trains "
        "in fp32",
        RUN,
        choices=AMP_PRECISIONS,
    )
    workers: int = _opt(0, "data loader worker processes", RUN)
    cache_size: int = _opt(2, "cases whose slice arrays stay in memory (per worker)", RUN)
    feature_cache_mb: int = _opt(
        4096, "memory for the frozen encoder's cached outputs (embeddings or TinyViT's stem); 0: none", RUN
    )
    feature_cache_dir: str | None = _opt(
        None,
        "also keep the frozen encoder's outputs in this folder, for later runs on the same slice files "
        "(4-8 MB per slice)",
        RUN,
    )
    resume: bool = _opt(False, "continue the run in --out (from OUT/last.pt)", RUN)
    overwrite: bool = _opt(
        False, "start again in an --out that holds an earlier run (its files are deleted)", RUN
    )
    log_every: int = _opt(0, "also log every N steps to log.jsonl", RUN)
    extra: dict[str, Any] = _opt({}, "metadata stored in the adapter", RUN, flag="")

    def check(self) -> None:
        """Raise :class:`UserInputError` for values no run can use."""
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "num_points": self.num_points,
            "cache_size": self.cache_size,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.data or not self.out:
            raise UserInputError("--data and --out are required")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserInputError(f"--max-steps must be >= 1, got {self.max_steps}")
        for name in ("lora_rank", "click_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserInputError(f"--{name.replace('_', '-')} must be a whole number >= 0, got {value!r}")
        if self.lora_rank == 0 and not self.train_decoder:
            raise UserInputError("--lora-rank 0 trains no LoRA: add --train-decoder, or nothing would train")
        if self.feature_cache_mb < 0:
            raise UserInputError(f"--feature-cache-mb must be >= 0, got {self.feature_cache_mb}")
        check_prompt_mode(self.prompt)
        numbers = ("lr", "weight_decay", "dice_weight", "ce_weight", "drop_prob", "val_fraction")
        for name in (*numbers, "first_click_prob", "iou_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserInputError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise UserInputError(f"--lora-alpha must be a positive number, got {self.lora_alpha!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.iou_weight < 0:
            raise UserInputError("--lr must be > 0, --weight-decay and --iou-weight >= 0")
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight <= 0:
            raise UserInputError("--dice-weight and --ce-weight must be >= 0 and not both 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserInputError("--warmup-steps must be >= 0")
        if self.box_jitter < 0 or self.num_bg_points < 0 or self.workers < 0 or self.log_every < 0:
            raise UserInputError("--box-jitter, --num-bg-points, --workers and --log-every must be >= 0")
        for name in ("drop_prob", "first_click_prob"):
            if not 0.0 <= (value := getattr(self, name)) <= 1.0:
                raise UserInputError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserInputError(f"--device must be {DEVICE_HELP}, got {self.device!r}")
        if self.val_max_items is not None and self.val_max_items < 1:
            raise UserInputError("--val-max-items must be >= 1")
        if self.resume and self.overwrite:
            raise UserInputError(
                "--resume continues the run in --out and --overwrite starts it again: give one"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`sam_medical.model.build.build_sam` for this run's base model (with
        ``self.model`` as its name): the trainer and the end-of-run scoring build the same base."""
        return {
            "image_size": self.image_size,
            "checkpoint": self.checkpoint,
            "random_weights": self.random_weights,
            "seed": self.seed,
            "cache_dir": self.cache_dir,
            "download": self.download,
        }

    def val_kinds(self) -> list[str]:
        """The deterministic prompt kinds validated for this training mode (``mixed`` and click rounds: box
        and point; with click rounds ``point`` is one click, answered as served: best of three masks)."""
        return ["box", "point"] if self.prompt == "mixed" or self.click_rounds else [self.prompt]

    def trained_prompts(self) -> list[str]:
        """What the adapter's metadata says the model was trained on (``trained_prompts``): ``box`` and/or
        ``point`` as the ``prompt`` mode gives them, plus ``mask`` with click rounds (the previous mask fed
        back, three masks for a lone click, the IoU head trained: SAM's own training). Serving reads it:
        clicks of a box-only model go through the click-to-box search, ``mask`` turns on the best of three
        for a lone click (:mod:`sam_medical.inference.strategies`)."""
        kinds = {"box": ["box"], "point": ["point"]}.get(self.prompt, ["box", "point"])
        return ["box", "point", "mask"] if self.click_rounds else kinds


def default(name: str) -> Any:
    """The default of :class:`TrainConfig` field ``name``: the measured recipe, for other front ends (the
    MONAI Label app's ``sam_lora`` takes its training defaults from here)."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


# --- the app's option table, generated ---------------------------------------------------------


@dataclass(frozen=True)
class AppOption:
    """One option of the app's ``sam_lora`` table, generated from a :class:`TrainConfig` field's :class:`App`.

    ``default`` is a ``TrainConfig`` value; :meth:`request_value` gives what the table shows and a request
    sends (0 for None where ``zero_is_none``).
    """

    field: str
    key: str
    kind: type  #: bool, int, float or str
    default: Any
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    choices: tuple[str, ...] | None
    zero_is_none: bool

    def request_value(self, value: Any) -> Any:
        return 0 if value is None and self.zero_is_none else value


def _kind(f: dataclasses.Field) -> type:
    return bool if str(f.type).startswith("bool") else _value_type(f)


def app_options() -> list[AppOption]:
    """The options the app offers, in field order (each field whose ``app`` is an :class:`App`)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        app = f.metadata["app"]
        if not isinstance(app, App):
            continue
        choices = f.metadata.get("choices")
        out.append(
            AppOption(
                field=f.name,
                key=app.key or f.name,
                kind=_kind(f),
                default=default(f.name) if app.default is None else app.default,
                low=app.low,
                high=app.high,
                low_open=app.low_open,
                high_open=app.high_open,
                choices=tuple(choices) if choices else None,
                zero_is_none=app.zero_is_none,
            )
        )
    return out


# --- the command line, generated ---------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _flag(f: dataclasses.Field) -> str:
    flag = f.metadata.get("flag")
    return ("--" + f.name.replace("_", "-")) if flag is None else flag


def _value_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    return int if text.startswith("int") else float if text.startswith("float") else str


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add one option per :class:`TrainConfig` field (``only``: these fields), in groups, with its help and
    its default."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        flag = _flag(f)
        if not flag or (only is not None and f.name not in only):
            continue
        meta = f.metadata
        g = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("flag_help") or meta["help"]}
        if meta.get("negate"):
            kw.update(action="store_false", default=default)
        elif str(f.type).startswith("bool"):
            kw.update(action=argparse.BooleanOptionalAction, default=default)
            kw["help"] += " (default: %(default)s)"
        else:
            kw.update(
                type=_int_list if meta.get("list_of_int") else _value_type(f),
                default=default,
                required=bool(meta.get("required")),
            )
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if not meta.get("required") and "default" not in kw["help"]:
                kw["help"] += f" (default: {'none' if default is None else default})"
        g.add_argument(flag, **kw)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments (fields without a flag keep their defaults)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if _flag(f) and hasattr(args, f.name)
    }
    if values.get("max_steps") == 0:
        values["max_steps"] = None  # --max-steps 0: no cap
    return TrainConfig(**values)
