"""Shared fixtures: small seeded SAM models and canvases (torch is imported inside the fixtures)."""

from __future__ import annotations

import os
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """``$SAM_MEDICAL_CACHE`` in a session folder: exports and downloads made by tests never land in (or
    are read from) the user's ``~/.cache/sam_medical``. A test that sets it itself still wins."""
    old = os.environ.get("SAM_MEDICAL_CACHE")
    os.environ["SAM_MEDICAL_CACHE"] = str(tmp_path_factory.mktemp("sam_medical_cache"))
    yield
    if old is None:
        os.environ.pop("SAM_MEDICAL_CACHE", None)
    else:
        os.environ["SAM_MEDICAL_CACHE"] = old


@pytest.fixture
def tiny_model() -> tuple[Any, dict]:
    """``(sam, base_info)``: the ``tiny`` SAM at input size 256, seed 0, eval mode, CPU (fresh per test)."""
    from sam_medical.model.build import build_sam

    return build_sam("tiny", image_size=256, seed=0)


@pytest.fixture
def tiny_sam(tiny_model):
    """The ``tiny`` SAM alone (see :func:`tiny_model`)."""
    return tiny_model[0]


@pytest.fixture
def tiny_base_info(tiny_model) -> dict:
    return tiny_model[1]


@pytest.fixture
def canvases():
    """Two deterministic ``(256, 256, 3)`` uint8 canvases with a bright disc and a dark square on noise."""
    import torch

    g = torch.Generator().manual_seed(1234)
    img = torch.randint(0, 60, (2, 256, 256), generator=g, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    img[0][((yy - 100) ** 2 + (xx - 120) ** 2) < 40**2] += 150
    img[1][(yy > 60) & (yy < 140) & (xx > 30) & (xx < 90)] += 190
    return img.clamp(0, 255).to(torch.uint8)[..., None].expand(-1, -1, -1, 3).contiguous()


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """One folder of ONNX exports for every server a test session starts (the export of a model is made
    once, then loaded from this cache by digest), as ``--conf export_dir``."""
    return tmp_path_factory.mktemp("exports")
