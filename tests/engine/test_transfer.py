"""Cross-dataset transfer: ``busbench test --run DIR --dataset B``, the transfer matrix and union runs.

Synthetic BUSI, BUSBRA and Curated BUSI (which shares sample ids with BUSI, like the real datasets) are prepared
once; a tiny U-Net (32 px, two folds, one epoch) is trained on BUSI and on BUSBRA and each run is tested on its own
test split and on the other's, giving a 2 x 2 matrix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from engine_testdata import tiny_config

from busbench import cli
from busbench.data.manifest import manifest_sha256
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine.evaluate import PER_IMAGE_COLUMNS, evaluate_run
from busbench.engine.train import train
from busbench.errors import ConfigError, DataError
from busbench.report.aggregate import aggregate
from busbench.report.transfer import COLUMNS, write_transfer

FILES = ("fold0_per_image.csv", "fold1_per_image.csv", "ensemble_per_image.csv", "summary.csv")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three_datasets")
    synthesize("busi", root / "raw" / "BUSI", n=20, seed=1)
    synthesize("busbra", root / "raw" / "BUSBRA", n=20, seed=2)
    synthesize("curated_busi", root / "raw" / "Curated_BUSI", n=20, seed=3)
    prepare(["busi", "busbra", "curated_busi"], data_root=root, folds=2, test_size=0.25, progress=False)
    return root


def split_ids(root: Path, key: str) -> list[str]:
    manifest = pd.read_csv(root / "manifests" / f"{key}.csv")
    return sorted(manifest.loc[manifest["split"] == "test", "sample_id"].astype(str))


@pytest.fixture(scope="module")
def matrix(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs on BUSI and BUSBRA, each tested on both test splits; the own files are snapshotted in between."""
    out = tmp_path_factory.mktemp("transfer")
    runs = {}
    own = {}
    for key in ("busi", "busbra"):
        train(tiny_config(data_root, out, f"data.dataset={key}", "train.epochs=1"))
        runs[key] = out / "demo" / key / "unet"
        evaluate_run(runs[key])
        own[key] = {
            p: p.read_bytes() for p in sorted(runs[key].rglob("*")) if p.is_file() and p.name != ".lock"
        }
    for a, b in (("busi", "busbra"), ("busbra", "busi")):
        evaluate_run(runs[a], dataset=b)
    return {"out": out, "runs": runs, "own": own}


def test_transfer_results_mirror_the_own_test(matrix, data_root):
    run = matrix["runs"]["busi"]
    folder = run / "test_on_busbra"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    expected = split_ids(data_root, "busbra")
    for name in FILES[:3]:
        table = pd.read_csv(folder / name)
        assert list(table.columns[: len(PER_IMAGE_COLUMNS)]) == list(PER_IMAGE_COLUMNS)
        assert sorted(table["sample_id"].astype(str)) == expected
        assert set(table["dataset_key"]) == {"busbra"}
    summary = pd.read_csv(folder / "summary.csv", dtype={"fold": str})
    assert summary["fold"].tolist() == ["0", "1", "mean", "std", "ensemble"]
    assert set(summary["dataset"]) == {"busbra"} and set(summary["train_data"]) == {"busi"}
    assert (summary["n_test"] == len(expected)).all()
    ensemble = pd.read_csv(folder / "ensemble_per_image.csv")
    assert summary.set_index("fold").loc["ensemble", "dice"] == pytest.approx(ensemble["dice"].mean())
    own = pd.read_csv(run / "summary.csv", dtype={"fold": str})
    assert (
        summary[["best_epoch", "best_val_dice"]]
        .iloc[:2]
        .equals(own[["best_epoch", "best_val_dice"]].iloc[:2])
    )


def test_the_runs_own_files_are_untouched(matrix):
    for key, run in matrix["runs"].items():
        now = {p for p in run.rglob("*") if p.is_file() and p.name != ".lock" and "test_on_" not in str(p)}
        assert now == set(matrix["own"][key])
        assert all(p.read_bytes() == data for p, data in matrix["own"][key].items()), key


def test_two_by_two_matrix(matrix):
    csv_path, md_path = write_transfer([matrix["out"]])
    table = pd.read_csv(csv_path)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 2 * 2 * 2  # train x test x (ensemble, fold_mean)
    assert set(table["mode"]) == {"direct"}
    for (train_key, test_key), rows in table.groupby(["train_dataset", "test_dataset"]):
        run = matrix["runs"][train_key]
        summary_path = (
            run / "summary.csv" if train_key == test_key else run / f"test_on_{test_key}" / "summary.csv"
        )
        summary = pd.read_csv(summary_path, dtype={"fold": str}).set_index("fold")
        by_source = rows.set_index("source")
        for source, fold in (("ensemble", "ensemble"), ("fold_mean", "mean")):
            for metric in ("dice", "iou", "hd95", "n_test"):
                assert by_source.loc[source, metric] == pytest.approx(summary.loc[fold, metric])
        assert by_source.loc["fold_mean", "dice_std"] == pytest.approx(summary.loc["std", "dice"])
    md = md_path.read_text()
    assert "| train \\ test | busbra | busi |" in md
    ens = table[table["source"] == "ensemble"].set_index(["train_dataset", "test_dataset"])["dice"]
    assert f"| busi | {ens[('busi', 'busbra')]:.4f} | **{ens[('busi', 'busi')]:.4f}** |" in md


def test_cli_test_transfer_and_heatmap(matrix, capsys):
    run = matrix["runs"]["busbra"]
    assert cli.main(["test", "--run", str(run), "--dataset", "busi"]) == 0
    assert "test_on_busi" in capsys.readouterr().out
    out = matrix["out"] / "cli"
    assert cli.main(["transfer", str(matrix["out"]), "--out", str(out)]) == 0
    assert "# Cross-dataset transfer" in capsys.readouterr().out
    assert cli.main(["plot", "transfer", str(out / "transfer.csv"), "--out", str(out)]) == 0
    assert (out / "transfer_heatmap.png").stat().st_size > 0


def test_leaderboard_leaves_transfer_scores_out(matrix, tmp_path):
    board, _ = aggregate([matrix["out"]], out=tmp_path)
    rows = pd.read_csv(board)
    assert sorted(zip(rows["train_data"], rows["dataset"], strict=True)) == [
        ("busbra", "busbra"),
        ("busi", "busi"),
    ]


def test_bad_targets_are_refused_without_output(matrix):
    run = matrix["runs"]["busi"]
    with pytest.raises(ConfigError, match="own test; score it with busbench test --run DIR"):
        evaluate_run(run, dataset="busi")
    with pytest.raises(ConfigError, match="did you mean 'busbra'"):
        evaluate_run(run, dataset="busbr")
    with pytest.raises(
        DataError, match=r"manifest .*bus_uclm.csv not found; run `busbench prepare --datasets bus_uclm"
    ):
        evaluate_run(run, dataset="bus_uclm")
    assert not (run / "test_on_busi").exists() and not (run / "test_on_bus_uclm").exists()


def test_images_shared_with_the_training_data_are_left_out(matrix, data_root):
    run = matrix["runs"]["busi"]
    summary = pd.read_csv(evaluate_run(run, dataset="curated_busi"), dtype={"fold": str})
    busi = pd.read_csv(data_root / "manifests" / "busi.csv")
    seen = set(busi.loc[busi["split"] == "dev", "sample_id"]) & set(split_ids(data_root, "curated_busi"))
    assert seen, "the synthetic data should share some ids"
    excluded = pd.read_csv(run / "test_on_curated_busi" / "excluded.csv")
    assert set(excluded["sample_id"]) == seen
    kept = pd.read_csv(run / "test_on_curated_busi" / "ensemble_per_image.csv")
    assert sorted(kept["sample_id"]) == sorted(set(split_ids(data_root, "curated_busi")) - seen)
    assert (summary["n_test"] == len(kept)).all()
    # BUSBRA shares nothing with Curated BUSI: nothing is left out
    evaluate_run(matrix["runs"]["busbra"], dataset="curated_busi")
    assert not (matrix["runs"]["busbra"] / "test_on_curated_busi" / "excluded.csv").exists()


def test_fine_tuned_runs_get_their_own_rows(matrix, tmp_path):
    # a copy of the BUSBRA run whose config says it started from the BUSI run
    tuned = tmp_path / "results" / "ft" / "busbra" / "unet"
    shutil.copytree(matrix["runs"]["busbra"], tuned, ignore=shutil.ignore_patterns("test_on_*", ".lock"))
    cfg = yaml.safe_load((tuned / "config.yaml").read_text())
    cfg["experiment"]["name"] = "ft"
    cfg["train"]["init_from"] = str(matrix["runs"]["busi"])
    (tuned / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    table = pd.read_csv(write_transfer([tmp_path / "results"])[0])
    assert set(table["train_dataset"]) == {"busi->busbra"}
    assert set(table["mode"]) == {"finetune"} and set(table["init_dataset"]) == {"busi"}


def test_union_run_reports_each_dataset(data_root, tmp_path):
    train(tiny_config(data_root, tmp_path, "data.dataset=[busi, busbra]", "train.epochs=1"))
    run = tmp_path / "demo" / "busi+busbra" / "unet"
    evaluate_run(run)
    with pytest.raises(ConfigError, match="trained on busi\\+busbra"):
        evaluate_run(run, dataset="busbra")
    evaluate_run(run, dataset="curated_busi")
    table = pd.read_csv(write_transfer([tmp_path])[0])
    ensemble = table[table["source"] == "ensemble"].set_index("test_dataset")
    assert set(table["train_dataset"]) == {"busi+busbra"}
    assert sorted(ensemble.index) == ["busbra", "busi", "curated_busi"]
    for key in ("busi", "busbra"):
        per_image = pd.read_csv(run / "test" / "ensemble_per_image.csv")
        rows = per_image[per_image["dataset_key"] == key]
        assert sorted(rows["sample_id"].astype(str)) == split_ids(data_root, key)
        assert ensemble.loc[key, "n_test"] == len(rows)
        assert ensemble.loc[key, "dice"] == pytest.approx(rows["dice"].mean())
    # the union trained on BUSI's development images: those Curated BUSI test images are left out
    assert (run / "test_on_curated_busi" / "excluded.csv").is_file()


@pytest.fixture(scope="module")
def near_copy(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the data where BUSI test images X and Y are near-duplicates (one BUSI group, as the duplicate
    detector links them), Curated BUSI kept only Y (in its development split) and X is not a Curated BUSI
    development image; a run trained on Curated BUSI, and a run fine-tuned on BUSI from it."""
    root = tmp_path_factory.mktemp("near_copy")
    shutil.copytree(data_root, root / "data")
    manifests = root / "data" / "manifests"
    busi = pd.read_csv(manifests / "busi.csv", dtype=str, keep_default_na=False)
    curated = pd.read_csv(manifests / "curated_busi.csv", dtype=str, keep_default_na=False)
    curated_dev = set(curated.loc[curated["split"] == "dev", "sample_id"])
    busi_test = set(busi.loc[busi["split"] == "test", "sample_id"])
    x = sorted(busi_test - curated_dev)[0]
    y = sorted(busi_test & curated_dev)[0]
    busi.loc[busi["sample_id"] == x, "group_id"] = busi.loc[busi["sample_id"] == y, "group_id"].iloc[0]
    busi.to_csv(manifests / "busi.csv", index=False, lineterminator="\n")
    summary = json.loads((manifests / "busi.json").read_text())
    summary["manifest_sha256"] = manifest_sha256(manifests / "busi.csv")
    (manifests / "busi.json").write_text(json.dumps(summary))
    out = root / "results"
    train(tiny_config(root / "data", out, "data.dataset=curated_busi", "train.epochs=1"))
    curated_run = out / "demo" / "curated_busi" / "unet"
    train(
        tiny_config(
            root / "data",
            out,
            "experiment.name=ft",
            "data.dataset=busi",
            "train.epochs=1",
            f"train.init_from={curated_run}",
        )
    )
    return {"x": x, "y": y, "curated_run": curated_run, "ft_run": out / "ft" / "busi" / "unet", "root": root}


def test_near_copies_of_training_images_are_never_scored(near_copy):
    run = near_copy["curated_run"]
    evaluate_run(run, dataset="busi")
    excluded = pd.read_csv(run / "test_on_busi" / "excluded.csv")
    reasons = excluded.set_index("sample_id")["reason"]
    assert near_copy["x"] in reasons.index
    assert f"development image curated_busi {near_copy['y']}" in reasons[near_copy["x"]]
    for name in ("fold0", "fold1", "ensemble"):
        scored = set(pd.read_csv(run / "test_on_busi" / f"{name}_per_image.csv")["sample_id"])
        assert not scored & set(excluded["sample_id"])
    summary = pd.read_csv(run / "test_on_busi" / "summary.csv")
    assert (summary["n_excluded"] == len(excluded)).all()


def test_fine_tuned_run_leaves_out_what_its_source_learned(near_copy):
    """BUSI fine-tuned from a Curated BUSI run: its own BUSI test leaves out the source's development images."""
    run = near_copy["ft_run"]
    evaluate_run(run)
    excluded = pd.read_csv(run / "test" / "excluded.csv")
    curated = pd.read_csv(near_copy["root"] / "data" / "manifests" / "curated_busi.csv")
    busi = pd.read_csv(near_copy["root"] / "data" / "manifests" / "busi.csv")
    busi_test = set(busi.loc[busi["split"] == "test", "sample_id"])
    learned = set(curated.loc[curated["split"] == "dev", "sample_id"]) & busi_test
    assert learned | {near_copy["x"]} <= set(excluded["sample_id"])
    scored = set(pd.read_csv(run / "test" / "ensemble_per_image.csv")["sample_id"])
    assert scored == busi_test - set(excluded["sample_id"])


def test_a_changed_manifest_of_the_training_data_is_refused(near_copy, tmp_path):
    run = tmp_path / "curated" / "unet"
    shutil.copytree(near_copy["curated_run"], run, ignore=shutil.ignore_patterns("test_on_*", ".lock"))
    manifest = near_copy["root"] / "data" / "manifests" / "curated_busi.csv"
    original = manifest.read_bytes()
    try:
        manifest.write_bytes(original.replace(b"\n", b"\r\n", 1))  # same rows, other bytes
        with pytest.raises(DataError, match="curated_busi manifest .* changed since"):
            evaluate_run(run, dataset="busi")
    finally:
        manifest.write_bytes(original)
    assert not (run / "test_on_busi").exists()


def test_unions_of_datasets_sharing_images_are_refused(data_root, tmp_path):
    with pytest.raises(ConfigError, match="busi and curated_busi share images"):
        tiny_config(data_root, tmp_path, "data.dataset=[busi, curated_busi]")


def test_transfer_refuses_scores_written_before_the_exclusion(matrix, tmp_path):
    """A summary without n_excluded, of a run scored on a dataset sharing its training images, may hold rows
    scored on learned images: the matrix refuses it instead of tabulating contaminated numbers."""
    run = tmp_path / "results" / "demo" / "busi" / "unet"
    shutil.copytree(matrix["runs"]["busi"], run, ignore=shutil.ignore_patterns(".lock"))
    evaluate_run(run, dataset="curated_busi")
    summary = run / "test_on_curated_busi" / "summary.csv"
    pd.read_csv(summary).drop(columns=["n_excluded"]).to_csv(summary, index=False)
    with pytest.raises(DataError, match="rerun busbench test .* --dataset curated_busi"):
        write_transfer([tmp_path / "results"])
    (run / "test_on_curated_busi" / "summary.csv").unlink()
    own = run / "summary.csv"
    pd.read_csv(own).drop(columns=["n_excluded"]).to_csv(own, index=False)
    with pytest.raises(DataError, match="written before busbench left out"):
        write_transfer([tmp_path / "results"])
