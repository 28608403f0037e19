"""Where a training step's time goes, on the GPU when there is one: per-phase times and the PyTorch profiler.

The model and data are built by the CLI's own parser from the embedded default plus the options given (as on the
`fit` command line), with glibc's malloc set as `fit` sets it; matrix products run in TF32 (`torch.set_float32_matmul_precision("high")`). A step is the
module's `training_step` (in the trainer's precision context), the backward pass and an AdamW step on real
training batches moved to the device, each phase timed after a device synchronisation. Two uncounted warm-up steps,
four timed ones, then the profiler over two more; the first table is sorted by device (CUDA) time on a GPU, by
CPU time otherwise:

    python benchmarks/step_profile.py --config configs/ml-1m/hstu_mol.yaml
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from rails_lightning.runtime import keep_freed_memory
from train_step_cost import build, timed_step  # benchmarks/ is the script's own folder, hence on sys.path


def main_() -> None:
    options = sys.argv[1:]
    sys.argv[1:] = []
    warnings.filterwarnings("ignore", message=".*self.log.*")
    keep_freed_memory()  # glibc's malloc as `fit` sets it (on the CPU, large buffers are otherwise re-zeroed every step)
    torch.set_float32_matmul_precision("high")
    model, _, datamodule, step_context = build(options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimiser = model.build_optimizer()  # over the parameters as they now are, on the device
    started = time.perf_counter()
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == 8:
            break
    print(f"{len(batches)} batches built on the CPU in {time.perf_counter() - started:.3f} s; device {device}", flush=True)

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(batch, index: int) -> tuple[float, float, float, float]:
        """Seconds of the transfer, forward, backward and optimiser step."""
        started = time.perf_counter()
        batch = model.transfer_batch_to_device(batch, device, 0)
        synchronise()
        transfer = time.perf_counter() - started
        return (transfer, *timed_step(model, optimiser, batch, index, step_context, synchronise))

    for index in range(2):
        step(batches[index], index)
    for index in range(2, 6):
        print("step %d: transfer %.3f forward %.3f backward %.3f optimiser %.3f s" % (index, *step(batches[index], index)), flush=True)
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for index in range(6, 8):
            step(batches[index], index)
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(profile.key_averages().table(sort_by=sort_key, row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main_()
