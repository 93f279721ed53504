"""The ONNX runtime: export round trip, prompts at their true length, the cache (reuse, digest, rebuilding
corrupt files), refusing an export that disagrees, runtime option checks. ``tiny`` models (seconds); one
LiteMedSAM export checks TinyViT (dynamic batch, attention biases as constants) with its real weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sam_medical.errors import UserInputError
from sam_medical.inference import export_cache as exports
from sam_medical.inference import export_check, onnx_engine, onnx_export
from sam_medical.inference.engines import TorchEngine, check_runtime, resolve_runtime
from sam_medical.metrics import dice
from sam_medical.model import forward as sf

pytest.importorskip("onnxruntime")

PROMPTS = export_check.verification_prompts()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the server's export worker (2 OpenMP threads on 2 busy cores crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def exported(tiny_model, tmp_path):
    sam, info = tiny_model
    engine = exports.load_or_export(sam, tmp_path / "cache", info)
    return sam, info, engine, tmp_path / "cache" / engine.manifest["key"]


def test_export_round_trip_agrees_with_torch(exported, canvases):
    sam, _, engine, folder = exported
    assert engine.manifest["source"] == "export" and engine.name == "onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]
    assert engine.manifest["verification"]["min_dice"] >= 0.999
    torch_engine = TorchEngine(sam)
    images = sf.canvas_to_input(
        sam, torch.cat([canvases, canvases[:1]])
    )  # batch 3: the batch axis is dynamic
    ref, got = torch_engine.encode(images), engine.encode(images)
    assert got.shape == ref.shape and got.shape[0] == 3
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for name, kwargs, multimask in PROMPTS:
        batch = sf.PromptBatch(**kwargs, multimask_output=multimask)
        ref_low, ref_iou = torch_engine.decode(ref[1:2], batch)
        low, iou = engine.decode(ref[1:2], batch)
        assert low.shape == ref_low.shape and iou.shape == ref_iou.shape, name
        torch.testing.assert_close(low, ref_low, atol=1e-4, rtol=1e-4)
        assert dice(low > 0, ref_low > 0) >= 0.999, name
        torch.testing.assert_close(iou, ref_iou, atol=1e-4, rtol=1e-4)


def test_prompts_are_decoded_at_their_true_length():
    box = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    pts, lab = torch.tensor([[[5.0, 6.0], [7.0, 8.0]]]), torch.tensor([[1, 0]])
    coords, labels = onnx_engine.onnx_prompts(sf.PromptBatch(boxes=box), 1.0)
    assert coords.tolist() == [[[10, 20], [30, 40]]] and labels.tolist() == [[2, 3]]
    coords, labels = onnx_engine.onnx_prompts(
        sf.PromptBatch(points=pts, point_labels=lab), 4.0
    )  # no box: SAM's one padding point
    assert coords.tolist() == [[[20, 24], [28, 32], [0, 0]]] and labels.tolist() == [[1, 0, -1]]
    coords, labels = onnx_engine.onnx_prompts(
        sf.PromptBatch(points=pts, point_labels=lab, boxes=box), 1.0
    )  # with a box: no padding at all
    assert labels.tolist() == [[1, 0, 2, 3]] and coords.shape == (1, 4, 2)
    with pytest.raises(ValueError, match="points or a box"):
        onnx_engine.onnx_prompts(sf.PromptBatch(), 1.0)


def test_a_second_load_reuses_the_cache(exported, monkeypatch):
    sam, info, engine, folder = exported

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    again = exports.load_or_export(sam, folder.parent, info)
    assert again.manifest["source"] == "cache" and again.manifest["key"] == engine.manifest["key"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "encoder bytes changed": lambda d: _flip_bytes(d / "encoder.onnx"),
    "decoder truncated": lambda d: (d / "decoder.onnx").write_bytes((d / "decoder.onnx").read_bytes()[:1000]),
    "encoder missing": lambda d: (d / "encoder.onnx").unlink(),
    "manifest missing": lambda d: (d / "manifest.json").unlink(),
    "manifest garbage": lambda d: (d / "manifest.json").write_text("{not json"),
    "manifest of another export": lambda d: (d / "manifest.json").write_text(
        json.dumps({**json.loads((d / "manifest.json").read_text()), "key": "0" * 64})
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_cached_export_is_rebuilt_not_served(exported, corruption):
    sam, info, engine, folder = exported
    good = dict(engine.manifest["files"])
    CORRUPTIONS[corruption](folder)
    again = exports.load_or_export(sam, folder.parent, info)
    assert again.manifest["source"] == "export"
    assert again.manifest["files"] == good  # the export is deterministic
    assert exports.load_or_export(sam, folder.parent, info).manifest["source"] == "cache"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_an_export_that_disagrees_is_refused(tiny_model, tmp_path, monkeypatch):
    from sam_medical.model.build import build_sam

    sam, info = tiny_model
    other, _ = build_sam("tiny", image_size=256, seed=1)
    real_export = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda model, out, **kw: real_export(other, out, **kw))
    with pytest.raises(onnx_export.ExportMismatch, match="disagrees with PyTorch"):
        exports.load_or_export(sam, tmp_path / "cache", info)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing cached, no temporary folder left


def test_the_export_key_follows_weights_adapter_and_versions(tiny_base_info):
    base, _ = exports.export_key(tiny_base_info, None, "onnx")
    a1, _ = exports.export_key(tiny_base_info, {"version": "v1", "sha256": "aa"}, "onnx")
    a1b, _ = exports.export_key(tiny_base_info, {"version": "v1", "sha256": "bb"}, "onnx")
    seed1, _ = exports.export_key({**tiny_base_info, "seed": 1}, None, "onnx")
    assert len({base, a1, a1b, seed1}) == 4
    assert exports.export_key(dict(tiny_base_info), None, "onnx")[0] == base


def test_export_refuses_a_model_in_training_mode(tiny_sam, tmp_path):
    tiny_sam.train()
    with pytest.raises(ValueError, match="eval mode"):
        onnx_export.export_onnx(tiny_sam, tmp_path)


def test_runtime_options_are_checked(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu) == "onnx" and resolve_runtime("auto", cuda) == "torch"
    assert resolve_runtime("auto", cuda, "fp16") == "torch"
    with pytest.raises(UserInputError, match="runtime must be one of auto, torch, onnx, openvino"):
        check_runtime("tensorrt")
    with pytest.raises(UserInputError, match="precision bf16 runs on CUDA only"):
        resolve_runtime("torch", cpu, "bf16")
    with pytest.raises(UserInputError, match="precision must be one of"):
        resolve_runtime("torch", cpu, "int8")
    with pytest.raises(UserInputError, match="runtime onnx runs on the CPU"):
        resolve_runtime("onnx", cuda)
    monkeypatch.setattr("sam_medical.inference.engines.openvino_available", lambda: False)
    with pytest.raises(UserInputError, match=r"pip install 'sam-medical\[openvino\]'"):
        resolve_runtime("openvino", cpu)


def test_openvino_backend_agrees_when_installed(tiny_model, tmp_path):
    pytest.importorskip("openvino")
    sam, info = tiny_model
    engine = exports.load_or_export(sam, tmp_path, info, backend="openvino")
    assert engine.name == "openvino" and engine.manifest["verification"]["min_dice"] >= 0.999
    assert engine.manifest["key"] != exports.export_key(info, None, "onnx")[0]


def test_lite_medsam_export_is_exact_and_batch_dynamic(export_cache):
    """LiteMedSAM's real weights: TinyViT exports with a dynamic batch (verified at batch 2) and its
    masks agree with PyTorch to the pixel on the verification canvases."""
    from sam_medical.model.build import build_sam

    sam, info = build_sam("medsam_lite")
    engine = exports.load_or_export(sam, export_cache, info)  # the app tests' servers then load it
    ver = engine.manifest["verification"]
    assert ver["min_dice"] >= 0.999 and ver["embedding_rel"] < 1e-4, ver
    assert engine.manifest["base"]["weights_digest"] == info["weights_digest"]


def test_build_engine_gives_torch_and_onnx_with_equal_masks(tiny_model, tmp_path, canvases):
    import numpy as np

    from sam_medical.inference.decoding import CanvasPrompt, canvas_logits
    from sam_medical.inference.runtime import build_engine
    from sam_medical.inference.strategies import decode_prompts

    sam, info = tiny_model
    torch_engine = build_engine(sam, "torch", base_info=info)
    onnx = build_engine(sam, "onnx", base_info=info, export_dir=tmp_path / "exports", threads=1)
    assert torch_engine.name == "torch" and onnx.name == "onnx"
    assert build_engine(sam, "auto", base_info=info, export_dir=tmp_path / "exports").name == "onnx"
    with pytest.raises(ValueError, match="needs base_info and export_dir"):
        build_engine(sam, "onnx", base_info=info)
    prompts = [
        CanvasPrompt(box=np.array([85.0, 65.0, 175.0, 155.0])),
        CanvasPrompt(points=np.array([[130.0, 110.0]]), point_labels=np.array([1])),
        CanvasPrompt(points=np.array([[130.0, 110.0], [60.0, 200.0]]), point_labels=np.array([1, 0])),
    ]
    images = sf.canvas_to_input(sam, canvases[:1])
    want = decode_prompts(torch_engine, torch_engine.encode(images), prompts, multimask="auto")
    got = decode_prompts(onnx, onnx.encode(images), prompts, multimask="auto")
    for w, g in zip(want, got, strict=True):
        assert w.multimask == g.multimask
        assert dice(canvas_logits(w) > 0, canvas_logits(g) > 0) >= 0.999
