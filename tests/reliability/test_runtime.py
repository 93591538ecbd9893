"""What a training run does when something goes wrong while it runs: a kill in the middle of a checkpoint write,
Ctrl-C, a diverging loss, a full disk, and a second process on the same results folder.

Every case checks one clear message (or the kill's status), the exit status, that the results on disk are the
last good state (checkpoints load with ``weights_only=True`` and hold the epoch they should, nothing half-written
is left) and, where the run can go on, that rerunning the same command finishes with exactly the weights of a run
that was never disturbed (CPU, bit for bit).

Covered elsewhere, not repeated here: SIGKILL between epochs and SIGTERM (``tests/engine/test_resume.py``), the
atomic-write and lock primitives on their own (``test_atomic_and_locks.py``), a non-finite loss through the Python
API (``tests/engine/test_train.py``).

Real signals are sent by a small driver process (:data:`DRIVER`) that runs ``busbench train`` with one test hook
installed, so the signal lands at a chosen training batch or inside a chosen checkpoint write; nothing in busbench
itself is slowed down or instrumented for these tests.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from busbench import cli
from busbench.engine import checkpoint as ckpt
from busbench.engine import train as train_mod

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2
BATCH = 2
TIMEOUT = 300  # seconds for one child process; generous for a loaded two-core machine


def experiment_file(folder: Path, data_root: Path, out: Path, **train: object) -> Path:
    """A tiny experiment: 32 px, U-Net of base width 4, batch 2, 3 epochs, PNGs read directly (no cache)."""
    config = {
        "experiment": {"name": "rt"},
        "data": {
            "dataset": "busi",
            "data_root": str(data_root),
            "image_size": 32,
            "folds": 2,
            "num_workers": 0,
            "cache": False,
            "augment": "light",
        },
        "model": {"name": "unet", "params": {"base_width": 4}},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 3e-3, "early_stopping": None, **train},
        "eval": {"batch_size": 8},
        "output": {"root": str(out), "tensorboard": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fold_dir(out: Path, fold: int = 0) -> Path:
    return out / "rt" / "busi" / "unet" / f"fold{fold}"


def batches_per_epoch(data_root: Path, fold: int = 0) -> int:
    manifest = pd.read_csv(data_root / "manifests" / "busi.csv")
    return int(((manifest["split"] == "dev") & (manifest["fold"] != fold)).sum()) // BATCH


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes (``.<name>.<random><suffix>``); the lock file does not count."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock")


def load_weights_only(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights_only(a)["model"], load_weights_only(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def assert_matches_reference(done_fold: Path, reference: Path) -> None:
    for name in (ckpt.LAST, ckpt.BEST):
        assert_same_weights(done_fold / name, reference / name)
    logs = [pd.read_csv(d / "train_log.csv").drop(columns="seconds") for d in (done_fold, reference)]
    pd.testing.assert_frame_equal(*logs, check_exact=True)


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error" in line.lower()]


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Configs composed from the repository's configs/, for this process and for children."""
    monkeypatch.setenv("BUSBENCH_CONFIGS", os.fspath(REPO / "configs"))
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def reference(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fold 0 trained for 3 epochs without any disturbance: the weights every recovered run must end with."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BUSBENCH_CONFIGS", os.fspath(REPO / "configs"))
        config = experiment_file(folder, prepared, folder / "out")
        assert cli.main(["train", "--config", str(config), "--fold", "0"]) == 0
    return fold_dir(folder / "out")


# ------------------------------------------------------------------------------------------------ the driver

DRIVER = r"""
import io, os, signal, sys, time
import torch
from busbench import cli
from busbench.engine import train as train_mod

mode, at, extra, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]

# A terminal's Ctrl-C reaches a foreground process, whose SIGINT handler is Python's default (KeyboardInterrupt). A
# process started with SIGINT ignored (a background job of a non-interactive shell, nohup, some CI runners) inherits
# the ignore, Python then installs no handler, and the Ctrl-C sent below would be lost: the run would finish with
# status 0. Give the driver the disposition a terminal session has, whatever started the tests.
signal.signal(signal.SIGINT, signal.default_int_handler)

def at_batch(action):
    real = train_mod.build_loss
    seen = [0]
    def build(cfg):
        loss = real(cfg)
        def forward(outputs, target):
            seen[0] += 1
            if seen[0] == at:
                action()
            return loss(outputs, target)
        return forward
    train_mod.build_loss = build

if mode == "sigint":  # Ctrl-C as a terminal sends it, during training batch `at`; the file `extra` records it
    def interrupt():
        with open(extra, "w") as fh:
            fh.write(f"SIGINT at training batch {at}")
        os.kill(os.getpid(), signal.SIGINT)
    at_batch(interrupt)
elif mode == "hold":  # hold the fold lock at training batch `at` until the file `extra` appears
    def hold():
        open(extra + ".waiting", "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(extra) and time.monotonic() < deadline:
            time.sleep(0.02)
    at_batch(hold)
elif mode == "kill-in-save":  # SIGKILL halfway through the `at`-th write of checkpoint_last.pt
    real_save = torch.save
    seen = [0]
    def save(obj, f, *args, **kwargs):
        name = os.path.basename(getattr(f, "name", f) if not isinstance(f, (str, os.PathLike)) else f)
        if str(name).startswith(".checkpoint_last.pt."):
            seen[0] += 1
            if seen[0] == at:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                half = buf.getvalue()[: len(buf.getvalue()) // 2]
                if hasattr(f, "write"):
                    f.write(half)
                    f.flush()
                else:
                    with open(f, "wb") as fh:
                        fh.write(half)
                with open(extra, "w") as fh:
                    fh.write(str(len(buf.getvalue())))
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
else:
    raise SystemExit(f"unknown mode {mode}")
sys.exit(cli.main(argv))
"""


def driver(
    env: dict[str, str], mode: str, at: int, extra: Path | str, *args: object, sigint_ignored: bool = False
) -> subprocess.Popen:
    """The driver as a child process; ``sigint_ignored`` starts it with SIGINT ignored, as a background job is (an
    ignored disposition survives exec; it is set here around the start rather than in a ``preexec_fn``, which is
    unsafe in a process that runs threads)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
    try:
        return subprocess.Popen(
            [sys.executable, "-c", DRIVER, mode, str(at), str(extra), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    finally:
        if sigint_ignored:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


# ------------------------------------------------------------------------------------------------ kills and Ctrl-C


def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(
    prepared, reference, tmp_path, env, capsys, caplog
):
    out = tmp_path / "out"
    config = experiment_file(tmp_path, prepared, out)
    marker = tmp_path / "full_size"
    proc = driver(env, "kill-in-save", 2, marker, "train", "--config", config, "--fold", "0")
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, err
    folder = fold_dir(out)
    # killed while writing epoch 2: the half-written file is a temporary one beside the intact epoch-1 checkpoint
    (partial,) = [folder / n for n in hidden_leftovers(folder) if n.startswith(".checkpoint_last.pt.")]
    assert partial.stat().st_size < int(marker.read_text())
    last = load_weights_only(folder / ckpt.LAST)
    assert last["epoch"] == 1 and not last["finished"]
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (folder / "done.json").exists()
    assert (
        json.loads((folder / "run.json").read_text())["status"] == "running"
    )  # no chance to record anything

    code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")
    assert code == 0, err
    assert "resuming after epoch 1" in caplog.text
    assert_matches_reference(folder, reference)
    assert hidden_leftovers(folder) == []  # the half-written file was cleaned up, never read
    sessions = json.loads((folder / "run.json").read_text())["sessions"]
    assert [s["status"] for s in sessions] == ["killed", "completed"]


def test_ctrl_c_stops_cleanly_exits_130_and_the_rerun_completes(prepared, reference, tmp_path, env, capsys):
    out = tmp_path / "out"
    config = experiment_file(tmp_path, prepared, out)
    first_of_epoch_2 = batches_per_epoch(prepared) + 1
    sent = tmp_path / "sigint_sent"
    # started as a background job would be (SIGINT ignored): the outcome must not depend on how pytest was started
    proc = driver(
        env, "sigint", first_of_epoch_2, sent, "train", "--config", config, "--fold", "0", sigint_ignored=True
    )
    _, err = proc.communicate(timeout=TIMEOUT)
    assert sent.is_file(), (
        f"the driver never reached training batch {first_of_epoch_2}, so no Ctrl-C was sent\n{err}"
    )
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1] == "busbench train: interrupted"
    folder = fold_dir(out)
    assert f"{folder / ckpt.LAST} holds epoch 1. Run the same command again to resume" in err
    assert load_weights_only(folder / ckpt.LAST)["epoch"] == 1
    assert hidden_leftovers(folder) == [] and not (folder / "done.json").exists()
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "interrupted" and info["sessions"][-1]["end"] is not None

    code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")
    assert code == 0, err
    assert (folder / "done.json").is_file()
    assert_matches_reference(folder, reference)
    assert [s["status"] for s in json.loads((folder / "run.json").read_text())["sessions"]] == [
        "interrupted",
        "completed",
    ]


# ------------------------------------------------------------------------------------------------ divergence


def poison_loss_from(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The training loss becomes NaN from training batch ``batch`` on (as an exploding run's would)."""
    real = train_mod.build_loss
    seen = {"n": 0}

    def build(cfg):
        loss = real(cfg)

        def forward(outputs, target):
            seen["n"] += 1
            value = loss(outputs, target)
            return value * float("nan") if seen["n"] >= batch else value

        return forward

    monkeypatch.setattr(train_mod, "build_loss", build)


def test_nan_loss_is_one_error_line_keeps_the_last_good_epoch_and_records_diverged(
    prepared, tmp_path, env, capsys, monkeypatch
):
    out = tmp_path / "out"
    config = experiment_file(tmp_path, prepared, out)
    with monkeypatch.context() as m:
        poison_loss_from(m, batches_per_epoch(prepared) + 1)  # epoch 2 diverges
        code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")
    assert code == 1
    (line,) = error_lines(err)
    folder = fold_dir(out)
    assert line.startswith("busbench train: error: fold 0: the training loss became nan during epoch 2")
    assert f"{folder / ckpt.LAST} keeps the last good epoch (1)" in line
    assert "train.lr" in line and "--force" in line
    for name in (ckpt.LAST, ckpt.BEST):
        payload = load_weights_only(folder / name)
        assert payload["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in payload["model"].values())
    assert pd.read_csv(folder / "train_log.csv")["epoch"].tolist() == [1]
    assert hidden_leftovers(folder) == [] and not (folder / "done.json").exists()
    assert json.loads((folder / "run.json").read_text())["status"] == "diverged"

    # following the advice: a lower rate replaces the diverged run
    code, err = run_cli(
        capsys, "train", "--config", config, "--fold", "0", "--set", "train.lr=1e-3", "--force"
    )
    assert code == 0, err
    assert load_weights_only(folder / ckpt.LAST)["epoch"] == EPOCHS
    assert json.loads((folder / "run.json").read_text())["status"] == "completed"


def test_nan_in_the_first_epoch_says_nothing_was_saved(prepared, tmp_path, env, capsys, monkeypatch):
    out = tmp_path / "out"
    config = experiment_file(tmp_path, prepared, out, epochs=1)
    poison_loss_from(monkeypatch, 1)
    code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")
    assert code == 1
    (line,) = error_lines(err)
    assert "during epoch 1" in line and "nothing was saved" in line
    assert "keeps the last good epoch" not in line
    folder = fold_dir(out)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "run.json"]
    assert json.loads((folder / "run.json").read_text())["status"] == "diverged"


# ------------------------------------------------------------------------------------------------ full disk


class FullDisk:
    """A buffered file on a disk with 256 bytes left: the write that meets the full disk fails; later small writes
    seem to work (they only reach the buffer), so torch's writer goes on to close the archive and trips over its
    own position check - what a real full disk does to torch.save."""

    def __init__(self, file) -> None:
        self.file = file
        self.left = 256
        self.failed = False

    def write(self, data: bytes) -> int:
        data = bytes(data)
        if self.failed:
            return len(data)
        if len(data) > self.left:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def no_space_in_checkpoint_writes_from(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """From the ``call``-th checkpoint write on, the disk is full (torch's real writer sees the failing writes)."""
    real = torch.save
    seen = {"n": 0}

    def save(obj, f, *args, **kwargs):
        seen["n"] += 1
        return real(obj, FullDisk(f) if seen["n"] >= call else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_during_a_checkpoint_write(prepared, reference, tmp_path, env, capsys, monkeypatch):
    out = tmp_path / "out"
    config = experiment_file(tmp_path, prepared, out)
    with monkeypatch.context() as m:
        # epoch 1 writes checkpoint_best.pt and checkpoint_last.pt; the third write (epoch 2) fails
        no_space_in_checkpoint_writes_from(m, 3)
        code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")
    assert code == 1
    (line,) = error_lines(err)
    folder = fold_dir(out)
    assert re.fullmatch(
        rf"busbench train: error: no space left on the device while writing {re.escape(str(folder))}/"
        r"checkpoint_(best|last)\.pt; the previous version is intact\. Free disk space .* run the command again",
        line,
    ), line
    assert load_weights_only(folder / ckpt.LAST)["epoch"] == 1
    assert load_weights_only(folder / ckpt.BEST)["epoch"] == 1
    assert hidden_leftovers(folder) == [] and not (folder / "done.json").exists()
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "failed" and "no space left" in info["sessions"][-1]["error"]

    code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")  # space freed: resume
    assert code == 0, err
    assert_matches_reference(folder, reference)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A real 8 MiB filesystem (tmpfs), where mounting is allowed (root); skipped elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip()[:100]}); the simulated full-disk test runs"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_disk_is_a_clear_error_and_the_run_resumes_after_freeing_space(
    prepared, reference, tmp_path, tiny_tmpfs, env, capsys, monkeypatch
):
    """A disk that fills up while the run trains: torch's own writer must not turn ENOSPC into a traceback."""
    out = tiny_tmpfs / "results"
    config = experiment_file(tmp_path, prepared, out)
    filler = tiny_tmpfs / "filler"
    real = train_mod.build_loss
    seen = {"n": 0}
    first_of_epoch_2 = batches_per_epoch(prepared) + 1

    def build(cfg):
        loss = real(cfg)

        def forward(outputs, target):
            seen["n"] += 1
            if seen["n"] == first_of_epoch_2:  # another program fills the disk, leaving 64 KiB
                stat = os.statvfs(tiny_tmpfs)
                filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 64 * 1024))
            return loss(outputs, target)

        return forward

    with monkeypatch.context() as m:
        m.setattr(train_mod, "build_loss", build)
        code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")
    assert code == 1
    (line,) = error_lines(err)
    folder = fold_dir(out)
    assert re.search(
        r"no space left on the device while writing \S+/checkpoint_(best|last)\.pt; the previous version is intact",
        line,
    ), line
    assert load_weights_only(folder / ckpt.LAST)["epoch"] == 1
    assert hidden_leftovers(folder) == [] and not (folder / "done.json").exists()
    assert json.loads((folder / "run.json").read_text())["status"] == "failed"

    filler.unlink()
    code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")
    assert code == 0, err
    assert_matches_reference(folder, reference)


# ------------------------------------------------------------------------------------------------ two processes


def test_second_training_of_a_busy_fold_is_refused_naming_the_holder(prepared, tmp_path, env, capsys):
    """Two ``busbench train`` on one results folder: the same fold is refused at once (the lock names its holder),
    another fold of the same run trains alongside, and both folds end complete and valid."""
    out = tmp_path / "out"
    config = experiment_file(tmp_path, prepared, out)
    go = tmp_path / "go"
    first = driver(env, "hold", 1, go, "train", "--config", config, "--fold", "0")
    try:
        deadline = time.monotonic() + TIMEOUT
        while not Path(f"{go}.waiting").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not Path(f"{go}.waiting").exists():
            first.kill()
            pytest.fail(f"the first training never reached its first batch: {first.communicate()[1][-2000:]}")
        folder = fold_dir(out)
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}

        code, err = run_cli(capsys, "train", "--config", config, "--fold", "0")
        assert code == 1
        (line,) = error_lines(err)
        holder = rf"pid {first.pid} on {re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\dT[\d:]{{8}}"
        assert re.fullmatch(
            rf"busbench train: error: {re.escape(str(folder))} is in use by {holder}; wait for that run to "
            r"finish \(or pass a different experiment\.name / output\.root\)",
            line,
        ), line
        after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}
        assert after == before  # the refused process touched nothing of the running fold

        code, err = run_cli(capsys, "train", "--config", config, "--fold", "1")
        assert code == 0, err
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, first_err
    for fold in (0, 1):
        d = fold_dir(out, fold)
        assert (d / "done.json").is_file() and hidden_leftovers(d) == []
        assert load_weights_only(d / ckpt.LAST)["epoch"] == EPOCHS
        sessions = json.loads((d / "run.json").read_text())["sessions"]
        assert [s["status"] for s in sessions] == ["completed"]
