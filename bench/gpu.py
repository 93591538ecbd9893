"""Training throughput of every registered model: fp32 vs bf16 autocast, with and without channels_last.

On a CUDA machine (``bash bench/gpu.sh``) it measures images/s of forward + backward + AdamW step at 224 and 256 px
with batch 16, and whether the step fits in GPU memory. On the CPU it runs a tiny version (64 px, batch 2, one timed
step) so the script is known to work before GPU time is spent on it. Results go to a CSV; this is a benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch

from busbench.errors import ModelError
from busbench.models import create_model, list_models

FIELDS = [
    "model",
    "size",
    "batch",
    "precision",
    "channels_last",
    "status",
    "images_per_s",
    "peak_mem_gb",
    "device",
]


def step_time(model, x, y, precision: str, steps: int, warmup: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    device_type = x.device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        one()
    if device_type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device_type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def measure(
    name: str,
    size: int,
    batch: int,
    precision: str,
    channels_last: bool,
    device: torch.device,
    steps: int,
    warmup: int,
) -> dict:
    row = {
        "model": name,
        "size": size,
        "batch": batch,
        "precision": precision,
        "channels_last": channels_last,
        "device": device.type,
    }
    try:
        model = create_model(name, in_channels=1, num_classes=1, image_size=size).to(device).train()
    except ModelError as exc:
        return row | {"status": f"unsupported: {exc}".split(";")[0], "images_per_s": "", "peak_mem_gb": ""}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch, 1, size, size, device=device).to(memory_format=memory_format)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.7).float()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds = step_time(model, x, y, precision, steps, warmup)
        status, ips = "ok", f"{batch / seconds:.1f}"
    except torch.OutOfMemoryError:
        status, ips = "out of memory", ""
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device.type == "cuda" else ""
    del model, x, y
    return row | {"status": status, "images_per_s": ips, "peak_mem_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/gpu_results.csv"))
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke version: 64 px, batch 2, one step")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sizes, batch, steps, warmup = ((224, 256), 16, 10, 3) if cuda else ((64,), 2, 1, 1)
    names = args.models or [n for n in list_models() if n not in {"smp"}]
    precisions = ("fp32", "bf16") if cuda or torch.backends.mkldnn.is_available() else ("fp32",)

    print(
        f"# {platform.node()} {device} torch {torch.__version__}"
        + (f" {torch.cuda.get_device_name()}" if cuda else "")
    )
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        for name in names:
            for size in sizes:
                for precision in precisions:
                    for channels_last in (False, True):
                        row = measure(name, size, batch, precision, channels_last, device, steps, warmup)
                        rows.append(row)
                        writer.writerow(row)
                        fh.flush()
                        print(
                            f"{name:>14} {size:4d} {precision:5} cl={int(channels_last)} {row['status']:>14} "
                            f"{row['images_per_s']:>8} img/s {row['peak_mem_gb']:>6} GB",
                            flush=True,
                        )
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
