"""The shared ``--device`` parser."""

import pytest
import torch

from sam_medical.device import resolve_device
from sam_medical.errors import UserInputError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_names_are_user_errors(name):
    with pytest.raises(UserInputError, match="auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cuda_without_a_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserInputError, match="no CUDA GPU"):
        resolve_device("cuda", local_rank=1)
