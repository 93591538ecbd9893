"""BUS-UCLM label rule: where INFO.csv's Label and the mask colours disagree, the mask decides."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from busbench.data.adapters import get_adapter
from busbench.data.adapters.bus_uclm import label_from_mask
from busbench.data.synth import synthesize


def test_label_from_mask_rule():
    m = np.zeros((4, 4), np.uint8)
    assert label_from_mask(m, "benign") == "normal"
    m[0, 0] = 1
    assert label_from_mask(m, "normal") == "benign" and label_from_mask(m, "malignant") == "benign"
    m[1, :2] = 2
    assert label_from_mask(m, "benign") == "benign" and label_from_mask(m, "malignant") == "malignant"
    assert label_from_mask(m, "normal") == "malignant"  # both colours, no lesion label: more red pixels


def test_rows_disagreeing_with_their_masks_are_relabelled_by_the_mask(tmp_path):
    synthesize("bus_uclm", tmp_path / "BUS-UCLM", n=12, seed=3)
    adapter = get_adapter("bus_uclm")
    folder = adapter.locate(tmp_path)
    before = {s.sample_id: s for s in adapter.scan(folder)}
    normal = next(s for s in before.values() if s.label == "normal" and s.patient_id != "HESN")
    lesion = next(s for s in before.values() if s.label == "malignant" and s.patient_id != "HESN")
    rgb = np.asarray(Image.open(normal.mask_paths[0]).convert("RGB")).copy()
    rgb[5:15, 5:15] = (0, 255, 0)  # a "Normal" row whose mask holds a benign lesion
    Image.fromarray(rgb).save(normal.mask_paths[0])
    rgb = np.asarray(Image.open(lesion.mask_paths[0]).convert("RGB")).copy()
    rgb[:] = 0  # a "Malignant" row with an empty mask
    Image.fromarray(rgb).save(lesion.mask_paths[0])

    after = {s.sample_id: s for s in adapter.scan(folder)}
    assert after[normal.sample_id].label == "benign" and after[lesion.sample_id].label == "normal"
    assert adapter.relabelled == {
        normal.sample_id: ("normal", "benign"),
        lesion.sample_id: ("malignant", "normal"),
    }
    assert {k: s.label for k, s in after.items() if k not in adapter.relabelled} == {
        k: s.label for k, s in before.items() if k not in adapter.relabelled
    }
    notes = adapter.decode(after[normal.sample_id]).notes
    assert any("INFO.csv says Normal but the mask colours say benign" in n for n in notes)


@pytest.mark.realdata
def test_real_sample_has_no_label_mask_disagreement(real_data_root):
    adapter = get_adapter("bus_uclm")
    samples = adapter.scan(adapter.locate(real_data_root))
    assert len(samples) == 70 and adapter.relabelled == {}
    counts = {label: sum(s.label == label for s in samples) for label in ("normal", "benign", "malignant")}
    assert counts == {"normal": 28, "benign": 21, "malignant": 21}
