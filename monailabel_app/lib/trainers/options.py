"""The options of a ``sam_lora`` training request: types and bounds, checked before a run is accepted.

The training options and their bounds are declared once, on :class:`sam_medical.training.config.TrainConfig`
(:func:`~sam_medical.training.config.app_options`); the publish options are the
:class:`sam_medical.training.outcome.PublishRule`'s. The server checks a request with :func:`train_options`
when ``POST /train/sam_lora`` arrives (a bad option is a 422 at once, not a run that fails later), and the
training subprocess reads it again with the same function. The bounds keep one request from taking the
machine: ``lora_rank=1000000`` once made the training process grow to 20.6 GB before it was killed.
"""

from __future__ import annotations

from typing import Any

from sam_medical.errors import UserInputError
from sam_medical.training.config import app_options
from sam_medical.training.outcome import DEFAULT_ALPHA, DEFAULT_MIN_ITEMS, NOISE_MARGIN, PublishRule

from ..settings import SamAppConfig, as_float, as_int, first, parse_train_option

PUBLISH_POLICIES = ("if_better", "always")
#: Inclusive bounds of ``publish_min_items``.
MIN_ITEMS_BOUNDS = (1, 100_000)


def option_table(defaults: SamAppConfig) -> dict[str, Any]:
    """What Slicer shows for ``sam_lora`` (``/info/``'s ``config``): each option with its default (the
    default first in a list of choices), then the publish options."""
    table: dict[str, Any] = {}
    for o in app_options():
        value = o.request_value(defaults.train_defaults[o.field])
        table[o.key] = [value, *[c for c in o.choices if c != value]] if o.choices else value
    return {
        **table,
        "publish": list(PUBLISH_POLICIES),
        "publish_margin": NOISE_MARGIN,
        "publish_alpha": DEFAULT_ALPHA,
        "publish_min_items": DEFAULT_MIN_ITEMS,
    }


def train_options(request: dict[str, Any], defaults: SamAppConfig) -> dict[str, Any]:
    """The run's options from ``request`` (missing ones from the app's ``--conf`` defaults).

    Returns a dict with one entry per :func:`~sam_medical.training.config.app_options` option under its
    ``TrainConfig`` field name (``lr``, ``epochs``, ``lora_rank``, ``prompt``, ``max_steps`` (None: no cap),
    ``batch_size``, ``train_decoder``, ``val_fraction``, ``val_max_items`` (None: all), ...), ``publish``
    and the ``if_better`` rule (:class:`sam_medical.training.outcome.PublishRule`): ``publish_margin`` (the
    least validation Dice gain), ``publish_alpha`` (the significance level of the paired test) and
    ``publish_min_items`` (fewer paired validation items: no test).

    Raises:
        UserInputError: naming the first option that has a wrong type or is out of bounds.
    """
    if not isinstance(request, dict):
        raise UserInputError(f"training options must be a JSON object, got {type(request).__name__}")
    publish = first(request.get("publish", "if_better"))
    if publish not in PUBLISH_POLICIES:
        raise UserInputError(f"publish must be one of {', '.join(PUBLISH_POLICIES)}, got {publish!r}")
    opts = {
        o.field: parse_train_option(o, request[o.key])
        if o.key in request
        else defaults.train_defaults[o.field]
        for o in app_options()
    }
    if opts["lora_rank"] == 0 and not opts["train_decoder"]:
        raise UserInputError("lora_rank 0 trains no LoRA: set train_decoder true, or nothing would train")
    rule = PublishRule(  # checks its own bounds
        margin=as_float(first(request.get("publish_margin", NOISE_MARGIN)), "publish_margin"),
        alpha=as_float(first(request.get("publish_alpha", DEFAULT_ALPHA)), "publish_alpha"),
        min_items=as_int(
            first(request.get("publish_min_items", DEFAULT_MIN_ITEMS)),
            "publish_min_items",
            MIN_ITEMS_BOUNDS[0],
            maximum=MIN_ITEMS_BOUNDS[1],
        ),
    )
    return {
        **opts,
        "publish": publish,
        "publish_margin": rule.margin,
        "publish_alpha": rule.alpha,
        "publish_min_items": rule.min_items,
    }
