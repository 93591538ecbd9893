"""BUS-BRA (Gómez-Flores et al. 2024): ``BUSBRA/{Images,Masks,bus_data.csv,5-fold-cv.csv,10-fold-cv.csv}``.

Layout: ``Images/bus_<NNNN>-<s>.png`` (8-bit grey), ``Masks/mask_<NNNN>-<s>.png`` (1-bit), with ``s`` in
{l, r, s}: each patient has an -l/-r pair or one -s image. ``bus_data.csv`` (comma-separated) gives one row per
image: ``ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX``.

Rules:

- ``patient_id`` is the ``Case`` column, zero-padded to 4 digits (``0001``); it must agree with the ID's number,
  so -l/-r images of one woman always share a patient and never straddle a split;
- the label is ``Pathology`` (benign/malignant; BUS-BRA has no normal images);
- every table row needs its image and mask, every image needs its row;
- ``official_fold`` is ``kFold`` (test fold 1..5) of ``5-fold-cv.csv`` when present; its IDs must match;
- pixels are trusted over the table: when ``Width``/``Height`` disagree with the image, :meth:`decode` keeps the
  pixel size and records the disagreement in the notes;
- Histology, BIRADS, Device, Side, BBOX, Width and Height are kept as metadata.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from busbench.data import layouts as L
from busbench.data.adapters.base import (
    Adapter,
    DecodedSample,
    MetadataTable,
    RawSample,
    make_sample,
    read_table,
    register_adapter,
)
from busbench.errors import DataError

META_COLUMNS = ("Histology", "BIRADS", "Device", "Side", "BBOX", "Width", "Height")


def _read_official_folds(path: Path, ids: set[str]) -> dict[str, int]:
    """``ID -> kFold`` from the official 5-fold file, checked against bus_data.csv's IDs."""
    rows = read_table(path, ",", ("ID", "kFold"))
    folds: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        sample_id, value = row["ID"], row["kFold"]
        if not value.isdigit() or not 1 <= int(value) <= 5:
            raise DataError(
                f"{path}: line {line} ({sample_id}) has kFold {value!r}, not 1..5; restore the original file"
            )
        folds[sample_id] = int(value)
    extra = sorted(set(folds) - ids)
    lacking = sorted(ids - set(folds))
    if extra or lacking:
        what = f"{extra[0]} is not in {L.BUSBRA_DATA_CSV}" if extra else f"{lacking[0]} has no row"
        raise DataError(
            f"{path}: IDs do not match {L.BUSBRA_DATA_CSV} ({what}; {len(extra)} extra, {len(lacking)} missing); "
            "use the fold file from the same BUS-BRA release"
        )
    return folds


@register_adapter
class BusbraAdapter(Adapter):
    key = "busbra"
    folder = "BUSBRA"
    labels = ("benign", "malignant")
    layout = "Images/bus_NNNN-s.png, Masks/mask_NNNN-s.png and bus_data.csv (the unpacked BUSBRA/ folder)"
    marks = ("Images/", L.BUSBRA_DATA_CSV)

    def list_samples(self, dataset_dir: Path) -> list[RawSample]:
        table = dataset_dir / L.BUSBRA_DATA_CSV
        rows = MetadataTable(table, read_table(table, ",", L.BUSBRA_REQUIRED))
        images_dir, masks_dir = dataset_dir / "Images", dataset_dir / "Masks"
        samples: list[RawSample] = []
        for where, row in rows:
            sample_id = row["ID"]
            match = L.BUSBRA_ID_RE.match(sample_id)
            if match is None:
                raise DataError(
                    f"{table}: {where} has ID {sample_id!r}, not 'bus_NNNN-l|r|s'; fix the row"
                )
            rows.add(sample_id, where, "ID")
            case = row["Case"]
            if not case.isdigit() or int(case) != int(match["case"]):
                raise DataError(
                    f"{table}: {where} ({sample_id}) has Case {case!r}, but the ID says {int(match['case'])}; "
                    "restore the original file"
                )
            label = row["Pathology"].lower()
            if label not in self.labels:
                raise DataError(
                    f"{table}: {where} ({sample_id}) has Pathology {row['Pathology']!r}, not benign/malignant; "
                    "fix the row"
                )
            image_path = images_dir / f"{sample_id}.png"
            mask_path = masks_dir / L.busbra_mask_name(sample_id)
            rows.check_files(where, sample_id, image_path, mask_path)
            meta = {k: row[k] for k in META_COLUMNS if k in row}
            samples.append(
                make_sample(sample_id, label, image_path, mask_path, patient_id=f"{int(case):04d}", meta=meta)
            )
        rows.check_folder(images_dir, "image", by="stem")
        rows.check_folder(masks_dir, "mask", listed={L.busbra_mask_name(s) for s in rows.listed})
        fold_file = dataset_dir / L.BUSBRA_FOLD_FILES[5]
        if fold_file.is_file():
            folds = _read_official_folds(fold_file, rows.listed)
            samples = [dataclasses.replace(s, official_fold=folds[s.sample_id]) for s in samples]
        return samples

    def decode(self, sample: RawSample) -> DecodedSample:
        decoded = super().decode(sample)
        h, w = decoded.image.shape[:2]
        stated = (sample.meta.get("Width", ""), sample.meta.get("Height", ""))
        if all(v.isdigit() for v in stated) and (int(stated[0]), int(stated[1])) != (w, h):
            decoded.notes.append(
                f"{L.BUSBRA_DATA_CSV} says Width x Height = {stated[0]}x{stated[1]}, the image "
                f"is {w}x{h}; the pixels are used"
            )
        return decoded
