"""Where things compute (rrt.devices): every study's `device` parameter, resolved before any compute."""
import re

import pytest
import torch

from rrt.devices import resolve_device
from rrt.plans import STUDIES, Explore


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_has_a_device_that_defaults_to_auto(name):
    study = STUDIES[name]()
    assert study.device == "auto" and study.to_dict()["device"] == "auto"
    assert study.torch_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_is_honoured_and_an_unknown_device_is_named():
    assert Explore(device="cpu").torch_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="device='tpu': valid values are auto, cpu, cuda"):
        Explore(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_cuda_without_a_gpu_stops_the_study_saying_what_to_check():
    with pytest.raises(RuntimeError, match=re.escape(f"device='cuda' but torch {torch.__version__} sees no GPU")):
        Explore(device="cuda")
    with pytest.raises(RuntimeError, match="sees no GPU"):
        resolve_device("cuda:1")
