"""Where a split came from travels with it: the summary JSON names its source and the library versions, and a
run's provenance reads the split's seed and test size from that summary, never from the run's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prepare_testdata import synth_raw

from busbench.data.manifest import library_versions
from busbench.data.prepare import prepare
from busbench.engine.runlog import data_split_provenance, split_seed
from busbench.errors import DataError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prov")
    synth_raw(root, "busi", 24, seed=3)
    synth_raw(root, "bus_uc", 24, seed=3)
    prepare(["busi"], data_root=root, folds=3, test_size=0.25, seed=11, progress=False)
    prepare(["bus_uc"], data_root=root, folds=2, test_size=0.3, seed=5, progress=False)
    return root


def test_summary_names_the_split_source_and_versions(root):
    busi = json.loads((root / "manifests" / "busi.json").read_text())
    assert busi["splits"]["source"] == "drawn, seed 11"
    assert "not the BUSI public release" in busi["splits"]["statement"]
    assert busi["reference"]["status"] == "not the release"
    assert busi["versions"] == library_versions()
    bus_uc = json.loads((root / "manifests" / "bus_uc.json").read_text())
    assert "no reference split for bus_uc" in bus_uc["splits"]["statement"]
    assert bus_uc["reference"] == {"status": "no reference"}


def test_run_provenance_reads_the_manifest_summary(root):
    splits = data_split_provenance(["busi", "bus_uc"], root)
    assert splits["busi"]["source"] == "drawn, seed 11"
    assert (splits["busi"]["seed"], splits["busi"]["test_size"], splits["busi"]["folds"]) == (11, 0.25, 3)
    assert (splits["bus_uc"]["seed"], splits["bus_uc"]["test_size"]) == (5, 0.3)
    assert splits["busi"]["prepared_with"]["scikit-learn"] == library_versions()["scikit-learn"]
    assert split_seed(splits) == {"busi": 11, "bus_uc": 5}
    assert split_seed({"busi": splits["busi"]}) == 11


def test_documented_counts_line_for_a_dataset_without_reference(root, caplog):
    data = root / "again"
    prepare(["bus_uc"], data_root=data, raw_root=root / "raw", folds=2, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bus_uc:")]
    assert len(lines) == 1
    assert "24 images" in lines[0] and "the public release has 811 (358 benign, 453 malignant)" in lines[0]
    assert "787 missing" in lines[0]


def test_explicit_v1_on_files_that_are_not_the_release_is_refused(root, tmp_path):
    with pytest.raises(
        DataError, match=r"busi: 756 of the 780 images of the BUSI public release are missing"
    ):
        prepare(["busi"], data_root=tmp_path, raw_root=root / "raw", splits="v1", progress=False)
    with pytest.raises(DataError, match="busbench has no v1 split for bus_uc.*use --splits new"):
        prepare(["bus_uc"], data_root=tmp_path, raw_root=root / "raw", splits="v1", progress=False)
    assert not (tmp_path / "manifests").exists()
