"""Where things compute (rrt.devices): every study's `device` parameter, resolved before any compute."""
import re

import pytest
import torch

from rrt import devices
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


def test_cpu_description_names_the_model_and_the_precision_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nmodel name : Test CPU 9000\nflags : fpu sse2 avx2 avx512f avx512_bf16 ht\n"
                    "processor : 1\nmodel name : Test CPU 9000\nflags : fpu sse2 avx2 avx512f avx512_bf16 ht\n")
    assert devices.cpu_description(info) == "Test CPU 9000; avx2 avx512f avx512_bf16"
    info.write_text("model name : Old CPU\nflags : fpu sse2\n")
    assert devices.cpu_description(info) == "Old CPU; none of avx2/avx512f/avx512_bf16/amx_bf16"


def test_machine_report_names_the_precision_auto_picks(monkeypatch):
    monkeypatch.setattr(devices, "native_bf16", lambda device=None: False)
    report = devices.machine_report()
    assert report["training precision (auto)"] == "fp32" and report["serving dtype (auto)"] == "float32"
    assert report["bf16 matmuls"].startswith("no")
    monkeypatch.setattr(devices, "native_bf16", lambda device=None: True)
    report = devices.machine_report()
    assert report["training precision (auto)"] == "bf16 autocast" and report["serving dtype (auto)"] == "bfloat16"


def test_machine_command_prints_one_aligned_line_per_fact(capsys):
    from rrt.cli import main
    assert main(["machine"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0].strip() for line in lines] == list(devices.machine_report())
    assert len({line.index(str(value)) for line, value in zip(lines, devices.machine_report().values())}) == 1
