"""The whole nnU-Net round trip on a tiny synthetic dataset, on the CPU: export, plan and preprocess, train fold 0,
predict the test split, score it with busbench and put it on a leaderboard.

    python scripts/nnunet_interop.py [--work DIR] [--iterations 2] [--images 16]

Steps (each timed):

1. ``busbench synth`` + ``prepare``: ``--images`` BUSI-layout images, two folds;
2. ``busbench export nnunet --id 777``;
3. ``nnUNetv2_plan_and_preprocess -d 777 -c 2d --verify_dataset_integrity`` and the copy of ``splits_final.json``;
4. fold 0 trained by nnU-Net's shortest trainer, ``nnUNetTrainer_1epoch``, with its 250 iterations cut to
   ``--iterations`` (a subclass of the same name, run in this process: nnU-Net's own training loop, data loading,
   validation and checkpoint; the 250-iteration epoch takes more than 20 minutes on a 2-core CPU);
5. ``nnUNetv2_predict -f 0 -tr nnUNetTrainer_1epoch`` on ``imagesTs``;
6. ``busbench score`` and ``busbench aggregate``.

The network is barely trained, so its scores mean nothing; the point is that every file passes from one tool to the
other unchanged. Needs ``pip install "busbench[nnunet]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--iterations", type=int, default=2, help="training iterations of the one epoch")
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="busbench_nnunet_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
        "nnUNet_n_proc_DA": "1",
    }
    os.environ.update(env)  # before nnU-Net is imported: it reads its folders once
    bin_dir = Path(sys.executable).parent
    times: dict[str, float] = {}

    def step(name: str, command: list[str]) -> None:
        start = time.perf_counter()
        print(f"$ {' '.join(command)}", flush=True)
        subprocess.run(command, check=True, env={**os.environ, **env})
        times[name] = time.perf_counter() - start

    data = work / "data"
    step("synth", [str(bin_dir / "busbench"), "synth", "--layout", "busi", "--out", str(data / "raw" / "BUSI"),
                   "--n", str(args.images), "--overwrite"])  # fmt: skip
    step("prepare", [str(bin_dir / "busbench"), "prepare", "--datasets", "busi", "--data-root", str(data),
                             "--folds", "2", "--test-size", "0.25", "--splits", "new", "--quiet"])  # fmt: skip
    step("export", [str(bin_dir / "busbench"), "export", "nnunet", "--dataset", "busi", "--id", "777",
                    "--out", env["nnUNet_raw"], "--force", "--set", f"data.data_root={data}"])  # fmt: skip
    step("plan + preprocess", [str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "777", "-c", "2d",
                               "--verify_dataset_integrity", "-np", "1", "-npfp", "1"])  # fmt: skip
    name = "Dataset777_busi"
    shutil.copy(Path(env["nnUNet_raw"]) / name / "splits_final.json", Path(env["nnUNet_preprocessed"]) / name)

    import torch
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import (
        nnUNetTrainer_1epoch as Shortest,
    )

    class nnUNetTrainer_1epoch(Shortest):  # noqa: N801  (the name nnUNetv2_predict -tr looks up)
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):  # noqa: B008
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = args.iterations
            self.num_val_iterations_per_epoch = 1

    pre = Path(env["nnUNet_preprocessed"]) / name
    start = time.perf_counter()
    trainer = nnUNetTrainer_1epoch(
        json.loads((pre / "nnUNetPlans.json").read_text()),
        "2d",
        0,
        json.loads((pre / "dataset.json").read_text()),
        device=torch.device("cpu"),
    )
    trainer.run_training()
    times["train fold 0"] = time.perf_counter() - start
    pred = work / "nnunet_pred"
    step("predict", [str(bin_dir / "nnUNetv2_predict"), "-i", str(Path(env["nnUNet_raw"]) / name / "imagesTs"),
                     "-o", str(pred), "-d", "777", "-c", "2d", "-f", "0", "-tr", "nnUNetTrainer_1epoch",
                     "-device", "cpu", "-npp", "1", "-nps", "1"])  # fmt: skip
    results = work / "results"
    step("score", [str(bin_dir / "busbench"), "score", "--dataset", "busi", "--pred-dir", str(pred),
                   "--name", "nnunet_2d", "--set", f"data.data_root={data}", f"output.root={results}"])  # fmt: skip
    step("aggregate", [str(bin_dir / "busbench"), "aggregate", str(results), "--out", str(work / "leaderboard")])
    print("\nseconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"leaderboard: {work / 'leaderboard' / 'leaderboard.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
