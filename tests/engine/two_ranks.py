"""The two gloo processes of test_gpu_paths.py (a small module, so that each spawned process starts quickly)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from busbench.engine import distributed
from busbench.engine.seeding import device_rng_state, rng_state, set_rng_state


class TinyNet(nn.Module):
    """Two linear layers and a head this configuration never calls (as deep-supervision heads when it is off)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 1)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def used_grads(model: TinyNet) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for m in (model.fc1, model.fc2) for p in m.parameters()]).clone()


def worker(rank: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: per-rank CUDA generator states through a checkpoint; no_sync under accumulation."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results: dict = {}
        # Gradient accumulation: 4 micro-batches, accumulate=2 -> 2 all-reduces (one per step), and the summed
        # gradient equals the single-process gradient of all 8 images.
        torch.manual_seed(0)
        model = TinyNet()
        forward = distributed.wrap(model, torch.device("cpu"), accumulate=2)
        calls = {"n": 0}

        def counting_allreduce(state, bucket):
            calls["n"] += 1
            return dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future().then(
                lambda fut: fut.value()[0]
            )

        forward.register_comm_hook(None, counting_allreduce)
        gen = torch.Generator().manual_seed(1)
        data = torch.randn(2, 4, 2, 3, generator=gen)  # (rank, micro-batch, images, features)
        for i in range(4):
            step_now = (i + 1) % 2 == 0
            with distributed.gradient_sync(forward, step_now):
                loss = forward(data[rank, i]).pow(2).mean() / 2
                loss.backward()
            if step_now:
                results.setdefault("grads", []).append(used_grads(model))
                model.zero_grad(set_to_none=True)
        results["allreduce_calls"] = calls["n"]
        # A fake "current GPU" generator, different on each rank (each process draws dropout on its own GPU).
        device = {"state": torch.tensor([rank, 7, 7], dtype=torch.uint8)}
        torch.cuda.is_available = lambda: True
        torch.cuda.get_rng_state = lambda device_index="cuda": device["state"].clone()
        torch.cuda.set_rng_state = lambda state, device_index="cuda": device.__setitem__("state", state.clone())
        device["state"][1:] += 10 * (rank + 1)  # this rank's draws
        saved = device["state"].clone()
        state = rng_state(None, distributed.gather_lists([device_rng_state()]))  # what every rank computes
        path = Path(out_dir) / "rng.pt"
        if rank == 0:
            torch.save(state, path)  # rank 0 writes the checkpoint
        dist.barrier()
        device["state"] = torch.zeros(3, dtype=torch.uint8)  # a new process after the restart
        set_rng_state(torch.load(path, weights_only=True), None, rank=rank)
        results["restored"] = device["state"].tolist()
        results["saved"] = saved.tolist()

        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
