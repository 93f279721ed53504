"""The app's shared served model (``monailabel_app/lib/served_model.py``), in process: hot swap and roll back."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from adapters import save_tiny_adapter

from sam_medical.errors import UserInputError
from sam_medical.volume.io import Volume

APP = Path(__file__).resolve().parents[1] / "monailabel_app"


@pytest.fixture(scope="module")
def app_lib():
    sys.path.insert(0, str(APP))
    try:
        served = importlib.import_module("lib.served_model")
        configs = importlib.import_module("lib.settings")
    finally:
        sys.path.remove(str(APP))
    return served, configs


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """``ServedModel.load`` sets the calling thread's torch threads (as the server's serving thread)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def volume() -> Volume:
    arr = np.full((48, 40, 5), -1000.0, np.float32)
    arr[10:30, 8:30, :] = 50.0
    return Volume(arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def make_adapter(path: Path, seed: int = 0, random_weights_seed: int = 0) -> dict:
    """A tiny-model adapter whose LoRA B matrices are not zero (so it changes the outputs)."""
    return save_tiny_adapter(path, model_seed=random_weights_seed, lora_seed=seed, nonzero_b=True)


def logits(pred, vol) -> torch.Tensor:
    _, info = pred.segment_slice("vol", vol, 2, [(20, 20)])
    return info["low_res_logits"]


def test_hot_swap_keeps_running_requests_and_rolls_back(tmp_path, app_lib):
    served_mod, configs = app_lib
    cfg = configs.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny", "prefetch_slices": "0"})
    served = served_mod.ServedModel(cfg)
    assert served.describe()["loaded"] is False and served.describe()["random_weights"] is True
    served.load()
    assert served.torch_threads == max(1, (os.cpu_count() or 2) // 2) == torch.get_num_threads()
    base_state = {k: v.clone() for k, v in served._base.state_dict().items()}
    vol = volume()
    p0 = served.predictor()
    assert p0.model_version == "base"
    out0 = logits(p0, vol)

    make_adapter(tmp_path / "a.pt")
    v1 = served.store.publish(tmp_path / "a.pt")
    p1 = served.predictor()  # the next request sees the new version
    assert p1.model_version == v1 and p1 is not p0 and p1.sam is not p0.sam
    out1 = logits(p1, vol)
    assert not torch.allclose(out0, out1)
    # a request that started before the swap still runs on the model it started with
    torch.testing.assert_close(logits(p0, vol), out0)
    # the base model was never modified
    for k, v in served._base.state_dict().items():
        torch.testing.assert_close(v, base_state[k])
    # per-request choice, and roll back through the store
    assert served.predictor("none").model_version == "base"
    torch.testing.assert_close(logits(served.predictor("none"), vol), out0)
    assert served.predictor(v1) is p1
    served.store.select("none")
    assert served.predictor().model_version == "base"
    with pytest.raises(UserInputError, match="unknown adapter version"):
        served.predictor("20990101-000000-deadbeef")

    # --conf adapter V at start selects V (roll back / pin)
    cfg2 = configs.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny", "adapter": v1})
    served2 = served_mod.ServedModel(cfg2)
    served2.load()
    assert served2.current_version == v1 and served2.store.current()["version"] == v1
    torch.testing.assert_close(logits(served2.predictor(), vol), out1)
    with pytest.raises(UserInputError, match="unknown adapter version"):
        served_mod.ServedModel(
            configs.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny", "adapter": "nope"})
        ).load()


def test_an_adapter_for_another_base_is_not_served(tmp_path, app_lib):
    served_mod, configs = app_lib
    cfg = configs.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny"})
    served = served_mod.ServedModel(cfg)
    served.load()
    make_adapter(tmp_path / "good.pt")
    good = served.store.publish(tmp_path / "good.pt")
    assert served.predictor().model_version == good
    make_adapter(tmp_path / "other.pt", random_weights_seed=7)  # made for random weights of seed 7
    bad = served.store.publish(tmp_path / "other.pt")
    pred = served.predictor()
    assert pred.model_version == good  # the previous version stays
    assert bad in served.describe()["adapter_error"] and "seed" in served.describe()["adapter_error"]


def test_config_errors_are_clear(tmp_path, app_lib):
    _, configs = app_lib
    with pytest.raises(UserInputError, match="unknown; choose one of"):
        configs.SamAppConfig.from_conf(tmp_path, {"model": "vit_z"})
    with pytest.raises(UserInputError, match="use_pretrained_model must be true or false"):
        configs.SamAppConfig.from_conf(tmp_path, {"use_pretrained_model": "maybe"})
    with pytest.raises(UserInputError, match="unknown window"):
        configs.SamAppConfig.from_conf(tmp_path, {"window": "brain"})
    with pytest.raises(UserInputError, match="image size must be a multiple of 16"):
        configs.SamAppConfig.from_conf(tmp_path, {"model": "vit_b", "image_size": "300"})
    with pytest.raises(UserInputError, match="medsam_lite runs only at input size 256"):
        configs.SamAppConfig.from_conf(tmp_path, {"image_size": "1024"})
    cfg = configs.SamAppConfig.from_conf(tmp_path, {"model": "vit_b", "use_pretrained_model": "false"})
    assert cfg.random_weights and cfg.model_dir == tmp_path.resolve() / "model"


def test_onnx_runtime_serves_each_version_from_its_own_verified_export(tmp_path, app_lib):
    """``runtime onnx``: the base model runs on its export once ``load`` returns; a published adapter is
    served at once (on PyTorch) and then from its own export (another digest), with the masks of its
    merged PyTorch model; a restarted server loads both from the cache; a bad adapter is still refused."""
    pytest.importorskip("onnxruntime")
    served_mod, configs = app_lib
    conf = {"model": "tiny", "prefetch_slices": "0", "runtime": "onnx", "torch_threads": "1"}
    served = served_mod.ServedModel(configs.SamAppConfig.from_conf(tmp_path / "app", conf))
    served.load()
    base = served.runtime_status()
    assert base["serving"] == "onnx" and base["state"] == "ready" and base["source"] == "export", base
    assert served.describe()["runtime"]["export_digest"] == base["export_digest"]
    vol = volume()
    p0 = served.predictor()
    assert p0.engine.name == "onnx"
    torch_base = served_mod.TorchEngine(p0.sam)
    out0 = logits(p0, vol)

    make_adapter(tmp_path / "a.pt")
    v1 = served.store.publish(tmp_path / "a.pt")
    p1 = served.predictor()
    assert p1.model_version == v1  # served at once
    assert served.wait_runtime(v1, timeout=300)
    status = served.runtime_status(v1)
    assert status["serving"] == "onnx" and status["export_digest"] != base["export_digest"], status
    assert p1.engine.name == "onnx"
    out1 = logits(p1, vol)
    assert not torch.allclose(out0, out1)
    p1.engine = served_mod.TorchEngine(p1.sam)  # the merged PyTorch model gives the same mask
    p1.cache.clear()
    torch.testing.assert_close(logits(p1, vol), out1, atol=1e-4, rtol=1e-4)
    p0.engine = torch_base
    p0.cache.clear()
    torch.testing.assert_close(logits(p0, vol), out0, atol=1e-4, rtol=1e-4)

    make_adapter(tmp_path / "other.pt", random_weights_seed=7)  # made for another base: refused
    bad = served.store.publish(tmp_path / "other.pt")
    assert served.predictor().model_version == v1 and bad in served.describe()["adapter_error"]

    again = served_mod.ServedModel(configs.SamAppConfig.from_conf(tmp_path / "app", {**conf, "adapter": v1}))
    again.load()
    assert again.runtime_status()["source"] == "cache"
    assert again.runtime_status()["export_digest"] == status["export_digest"]
    assert len(list((tmp_path / "app" / "model" / "exports").iterdir())) == 2


def test_a_runtime_that_cannot_be_served_leaves_pytorch_serving(tmp_path, app_lib, monkeypatch):
    pytest.importorskip("onnxruntime")
    from sam_medical.inference import export_cache, onnx_export

    served_mod, configs = app_lib

    def broken(*args, **kwargs):
        raise onnx_export.ExportMismatch("the exported model disagrees with PyTorch")

    monkeypatch.setattr(export_cache, "load_or_export", broken)
    conf = {"model": "tiny", "prefetch_slices": "0", "runtime": "onnx"}
    served = served_mod.ServedModel(configs.SamAppConfig.from_conf(tmp_path / "app", conf))
    served.load()
    status = served.describe()["runtime"]
    assert status["state"] == "failed" and status["serving"] == "torch" and "disagrees" in status["error"]
    assert served.predictor().engine.name == "torch"
    mask, _ = served.predictor().segment_slice("vol", volume(), 2, [(20, 20)])
    assert mask.shape == (48, 40)


def test_runtime_options_at_start(tmp_path, app_lib):
    served_mod, configs = app_lib
    with pytest.raises(UserInputError, match="--conf runtime must be one of"):
        configs.SamAppConfig.from_conf(tmp_path, {"runtime": "tensorrt"})
    with pytest.raises(UserInputError, match="--conf precision must be one of"):
        configs.SamAppConfig.from_conf(tmp_path, {"precision": "int4"})
    cfg = configs.SamAppConfig.from_conf(tmp_path, {"model": "tiny", "precision": "bf16", "device": "cpu"})
    with pytest.raises(UserInputError, match="precision bf16 runs on CUDA only"):
        served_mod.ServedModel(cfg).load()
    cfg = configs.SamAppConfig.from_conf(
        tmp_path, {"model": "tiny", "runtime": "torch", "prefetch_slices": "0"}
    )
    served = served_mod.ServedModel(cfg)
    served.load()
    assert served.describe()["runtime"] == {
        "requested": "torch",
        "runtime": "torch",
        "serving": "torch",
        "state": "ready",
    }
    assert not (tmp_path / "model" / "exports").exists()


def test_clicks_and_masks_are_served_as_the_weights_were_trained(app_lib, tmp_path):
    """Issue 17/18: the strategy and the multimask rule follow ``trained_prompts`` unless set by --conf."""
    served_mod, configs = app_lib
    from sam_medical.inference.strategies import click_strategy

    cfg = configs.SamAppConfig.from_conf(tmp_path, {})
    assert cfg.multimask == "model" and cfg.click_strategy == "auto"
    served = served_mod.ServedModel(cfg)
    base = served.trained_prompts(None)
    assert base == ("box",)  # medsam_lite, the default model
    assert click_strategy(base, cfg.click_strategy) == "click_to_box"
    assert served.multimask_rule(None) == "off"
    mixed = {"trained_prompts": ["box", "point"]}  # today's recipe: boxes and clicks, single-mask token
    assert click_strategy(served.trained_prompts(mixed), cfg.click_strategy) == "direct"
    assert served.multimask_rule(mixed) == "off"
    clicked = {"trained_prompts": ["box", "point", "mask"]}  # an adapter trained with click rounds
    assert click_strategy(served.trained_prompts(clicked), cfg.click_strategy) == "direct"
    assert served.multimask_rule(clicked) == "auto"
    forced = served_mod.ServedModel(configs.SamAppConfig.from_conf(tmp_path, {"multimask": "false"}))
    assert forced.multimask_rule(clicked) == "off"
    tiny = served_mod.ServedModel(configs.SamAppConfig.from_conf(tmp_path, {"model": "tiny"}))
    assert tiny.trained_prompts(None) == () and tiny.multimask_rule(None) == "off"
    with pytest.raises(UserInputError, match="click_strategy must be one of"):
        configs.SamAppConfig.from_conf(tmp_path, {"click_strategy": "boxes"})
    with pytest.raises(UserInputError, match="multimask must be model, false or auto"):
        configs.SamAppConfig.from_conf(tmp_path, {"multimask": "maybe"})
