"""The options of a ``sam_lora`` training request: types and bounds, checked before a run is accepted.

The server checks a request with :func:`train_options` when ``POST /train/sam_lora`` arrives (a bad
option is a 422 at once, not a run that fails later), and the training subprocess reads it again with
the same function. The bounds keep one request from taking the machine: ``lora_rank=1000000`` once
made the training process grow to 20.6 GB before it was killed.
"""

from __future__ import annotations

from typing import Any

from sam_medical.errors import UserInputError
from sam_medical.prompts import PROMPT_MODES, check_prompt_mode
from sam_medical.training.outcome import DEFAULT_ALPHA, DEFAULT_MIN_ITEMS, NOISE_MARGIN, PublishRule

from ..configs.sam import SamAppConfig, as_bool, as_float, as_int

PUBLISH_POLICIES = ("if_better", "always")
PROMPTS = PROMPT_MODES
#: Inclusive bounds of the integer options.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "epochs": (1, 1000),
    "lora_rank": (0, 64),
    "batch_size": (1, 64),
    "max_steps": (0, 1_000_000),
    "val_max_items": (0, 100_000),
    "publish_min_items": (1, 100_000),
}
MAX_LEARNING_RATE = 1.0


def _first(value: Any) -> Any:
    """Slicer sends the first element of list-valued options; a JSON client may send the list."""
    return value[0] if isinstance(value, list) and value else value


def _bounded(value: Any, name: str) -> int:
    low, high = INT_BOUNDS[name]
    return as_int(value, name, low, maximum=high)


def train_options(request: dict[str, Any], defaults: SamAppConfig) -> dict[str, Any]:
    """The run's options from ``request`` (missing ones from the app's ``--conf`` defaults).

    Returns a dict with ``epochs``, ``lr``, ``lora_rank``, ``prompt``, ``max_steps`` (None: no cap),
    ``batch_size``, ``train_decoder``, ``val_fraction``, ``val_max_items`` (None: all), ``publish`` and
    the ``if_better`` rule (:class:`sam_medical.training.outcome.PublishRule`): ``publish_margin`` (the least
    validation Dice gain), ``publish_alpha`` (the significance level of the paired test) and
    ``publish_min_items`` (fewer paired validation items: no test).

    Raises:
        UserInputError: naming the first option that has a wrong type or is out of bounds.
    """
    if not isinstance(request, dict):
        raise UserInputError(f"training options must be a JSON object, got {type(request).__name__}")

    def get(key: str, default: Any) -> Any:
        return _first(request.get(key, default))

    publish = get("publish", "if_better")
    if publish not in PUBLISH_POLICIES:
        raise UserInputError(f"publish must be one of {', '.join(PUBLISH_POLICIES)}, got {publish!r}")
    prompt = get("prompt", defaults.prompt)
    check_prompt_mode(str(prompt), "prompt")
    val_fraction = as_float(get("val_fraction", 0.2), "val_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise UserInputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    lr = as_float(get("learning_rate", defaults.learning_rate), "learning_rate", positive=True)
    if lr > MAX_LEARNING_RATE:
        raise UserInputError(f"learning_rate must be at most {MAX_LEARNING_RATE}, got {lr}")
    rule = PublishRule(  # checks its own bounds
        margin=as_float(get("publish_margin", NOISE_MARGIN), "publish_margin"),
        alpha=as_float(get("publish_alpha", DEFAULT_ALPHA), "publish_alpha"),
        min_items=_bounded(get("publish_min_items", DEFAULT_MIN_ITEMS), "publish_min_items"),
    )
    lora_rank = _bounded(get("lora_rank", defaults.lora_rank), "lora_rank")
    train_decoder = as_bool(get("train_decoder", defaults.train_decoder), "train_decoder")
    if lora_rank == 0 and not train_decoder:
        raise UserInputError("lora_rank 0 trains no LoRA: set train_decoder true, or nothing would train")
    return {
        "epochs": _bounded(get("epochs", defaults.epochs), "epochs"),
        "lr": lr,
        "lora_rank": lora_rank,
        "prompt": prompt,
        "max_steps": _bounded(get("max_steps", defaults.max_steps), "max_steps") or None,
        "batch_size": _bounded(get("batch_size", defaults.batch_size), "batch_size"),
        "train_decoder": train_decoder,
        "val_fraction": val_fraction,
        "val_max_items": _bounded(get("val_max_items", 200), "val_max_items") or None,
        "publish": publish,
        "publish_margin": rule.margin,
        "publish_alpha": rule.alpha,
        "publish_min_items": rule.min_items,
    }
