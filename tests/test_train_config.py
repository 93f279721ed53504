"""A training option is declared once, on ``TrainConfig``: the CLI of ``sam-medical train``, the app's
``sam_lora`` option table (with bounds), its ``--conf`` defaults, the ``TrainConfig`` that ``sam_lora`` builds
and what ``sam-medical describe`` reports are all generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from sam_medical.cli.main import main as cli_main
from sam_medical.errors import UserInputError
from sam_medical.training import config as train_config
from sam_medical.training.config import APP_SETS, App, AppOption, TrainConfig, app_options, default

APP = Path(__file__).resolve().parents[1] / "monailabel_app"


@pytest.fixture(scope="module")
def app_lib():
    sys.path.insert(0, str(APP))
    try:
        settings = importlib.import_module("lib.settings")
        options = importlib.import_module("lib.trainers.options")
        sam_lora = importlib.import_module("lib.trainers.sam_lora")
    finally:
        sys.path.remove(str(APP))
    return settings, options, sam_lora


def other_value(o: AppOption) -> Any:
    """A value within ``o``'s bounds that is not its default."""
    if o.kind is bool:
        return not o.default
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    if o.kind is int:
        return next(v for v in (int(o.low) + 1, int(o.low) + 2) if v != o.default)
    return (o.low + o.high) / 2


def test_every_field_is_in_the_cli_and_has_a_place_in_the_app(tmp_path: Path, app_lib) -> None:
    settings, options, sam_lora = app_lib
    parser = argparse.ArgumentParser()
    train_config.add_arguments(parser)
    cli = {a.dest for a in parser._actions}
    offered = {o.field: o for o in app_options()}
    app = settings.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny"})
    table = options.option_table(app)
    built = sam_lora.run_config(app, options.train_options({}, app), tmp_path, None, ["case"])
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["flag"] == "" or f.name in cli, f.name  # only `extra` has no flag
        place = f.metadata["app"]
        assert isinstance(place, App) or place == APP_SETS, f.name  # every field says where the app has it
        if place == APP_SETS:
            assert f.name not in offered and hasattr(built, f.name)
            continue
        o = offered[f.name]
        assert o.key in table, f.name
        if o.kind in (int, float):
            assert o.low is not None and o.high is not None, f"{f.name}: an offered number needs bounds"
        # the table's default is the app's default, which is the CLI's unless declared otherwise
        assert getattr(built, f.name) == (default(f.name) if place.default is None else place.default)
        shown = table[o.key][0] if o.choices else table[o.key]
        assert shown == o.request_value(getattr(built, f.name))


def test_each_app_option_round_trips_into_the_run_config(tmp_path: Path, app_lib) -> None:
    settings, options, sam_lora = app_lib
    app = settings.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny"})
    for o in app_options():
        value = other_value(o)
        extra = {"lora_rank": 1} if o.field == "train_decoder" else {}  # something must train
        opts = options.train_options({o.key: o.request_value(value), **extra}, app)
        cfg = sam_lora.run_config(app, opts, tmp_path, None, ["case"])
        assert getattr(cfg, o.field) == value, o.key
        cfg.check()
        # the same value as an app default (--conf KEY VALUE, a string) reaches the run too
        conf = {"model": "tiny", o.key: str(o.request_value(value)), **{k: str(v) for k, v in extra.items()}}
        app2 = settings.SamAppConfig.from_conf(tmp_path / "app", conf)
        cfg2 = sam_lora.run_config(app2, options.train_options({}, app2), tmp_path, None, ["case"])
        assert getattr(cfg2, o.field) == value, o.key
        if o.high is not None:  # and the bounds are enforced
            with pytest.raises(UserInputError, match=o.key):
                options.train_options({o.key: o.high + 1}, app)


def test_describe_reports_what_train_trains_by_default(capsys) -> None:
    assert cli_main(["describe", "--model", "tiny"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["lora_rank"] == default("lora_rank") and row["train_decoder"] is default("train_decoder")
    assert row["trainable_params"] == row["decoder_params"] + row["lora_params"]
    assert row["lora_params"] == 0 and row["trainable_params"] > 0  # the recipe: the decoder alone


def test_cli_defaults_are_the_config_defaults() -> None:
    parser = argparse.ArgumentParser()
    train_config.add_arguments(parser)
    cfg = train_config.from_args(parser.parse_args(["--data", "d", "--out", "o"]))
    assert cfg == TrainConfig(data="d", out="o")
