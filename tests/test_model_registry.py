"""The model registry names its builders by ``"module:function"`` strings (so that it imports no torch
and ``--help`` stays fast): every such string must resolve to a function, and ``BaseModelSpec`` is
``build_sam``'s arguments written once."""

from __future__ import annotations

import pytest
import torch

from sam_medical.model.build import BaseModelSpec, build_sam
from sam_medical.model.registry import FAMILIES, load_callable


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_builder_and_lora_targets_string_resolves(name):
    fam = FAMILIES[name]
    for spec in (fam.builder, fam.lora_targets):
        assert callable(load_callable(spec)), spec


def test_base_model_spec_builds_what_build_sam_builds():
    spec = BaseModelSpec("tiny", seed=3)
    assert spec.kwargs() == {
        "image_size": None,
        "checkpoint": None,
        "random_weights": False,
        "seed": 3,
        "cache_dir": None,
        "download": True,
    }
    sam, info = spec.build()
    ref, ref_info = build_sam("tiny", seed=3)
    assert info == ref_info and info["random_weights"] is True
    assert all(
        torch.equal(a, b) for a, b in zip(sam.state_dict().values(), ref.state_dict().values(), strict=True)
    )
