"""Train one TrainConfig 2 steps on random tokens in this process; print its peak memory as JSON (test_memory.py).

argv[1]: JSON of TrainConfig fields plus "shape" (the model's HF config fields, model_type among them), saved as
config.json in the TrainConfig's `model` directory so that rrt.runs.memory reads the same shape. The peak is
VmHWM (the kernel's high-water mark of resident memory), reset through /proc/self/clear_refs once the original
model is built, minus the resident memory at that point, where train() starts: the process's libraries and the
original (a GPU run keeps it on the CPU) are not the run's. The reset matters: on a CI machine, ru_maxrss (never
reset) read the same 653 MB above that point for all nine runs, estimated at 383-560 MB: a peak reached while
importing and building, before training (`setup_peak` reports it). Run with MALLOC_MMAP_THRESHOLD_ fixed so that glibc maps every large block and returns it to the
kernel when freed; resident memory then follows the live tensors.
"""
import json
import resource
import sys

import torch
import transformers

from rrt.train import train
from rrt.trainconfig import TrainConfig


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def high_water() -> int:
    """VmHWM in bytes: the peak resident memory since the process started or clear_refs last reset it."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_high_water() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current resident size (Linux 4.0 and newer)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


if __name__ == "__main__":
    torch.set_num_threads(1)
    fields = json.loads(sys.argv[1])
    shape = fields.pop("shape")
    config = transformers.AutoConfig.for_model(shape.pop("model_type"), **shape)
    config.save_pretrained(fields["model"])
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    seqs = torch.randint(0, config.vocab_size, (64, fields["seq_len"]))
    setup_peak = high_water()
    reset_high_water()
    before = resident()
    train(TrainConfig(**fields), train_seqs=seqs, original=original, progress=lambda record: None)
    print(json.dumps({"before": before, "peak": high_water(), "setup_peak": setup_peak}))
