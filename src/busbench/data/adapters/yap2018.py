"""Yap2018 / UDIAT Dataset B (Yap et al. 2018): ``BUS/{original,GT}/<NNNNNN>.png`` + ``BUS/DatasetB.xlsx``.

Layout: 163 grey images with ids 000001-000147 and 000295-000310 (6-digit, zero-padded), a ground truth of the
same name in ``GT/`` (mostly 1-bit, some L 0/255), and ``DatasetB.xlsx``, sheet ``Hoja1`` with columns
``Image, Type, Diagnosis``. The Image cell is text (``'000001'``); Type is Benign/Malignant.

Rules:

- the sheet is read by header name, so the legend in columns F-G (header ``Llegend``) and blank columns are
  ignored, as are rows without an Image value (the legend's own rows);
- ids are normalised to 6 digits whether the cell holds text or a number;
- every row needs its image and GT, every image needs its row;
- Diagnosis is kept as metadata; one image per woman, so ``patient_id == sample_id``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from busbench.data import layouts as L
from busbench.data.adapters.base import (
    Adapter,
    MetadataTable,
    RawSample,
    make_sample,
    register_adapter,
)
from busbench.errors import DataError


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip().lstrip("'")


def read_sheet(path: Path) -> list[dict[str, str]]:
    """Rows of DatasetB.xlsx's data sheet as dicts keyed by the header names that are present."""
    from openpyxl import load_workbook

    if not path.is_file():
        raise DataError(f"{path}: metadata workbook not found; restore DatasetB.xlsx from the release")
    try:
        workbook = load_workbook(path, read_only=True, data_only=True)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path}: cannot read the workbook ({exc}); restore DatasetB.xlsx from the release"
        ) from None
    try:
        if L.YAP_SHEET in workbook.sheetnames:
            sheet = workbook[L.YAP_SHEET]
        elif len(workbook.sheetnames) == 1:
            sheet = workbook[workbook.sheetnames[0]]
        else:
            raise DataError(
                f"{path}: no sheet {L.YAP_SHEET!r} (sheets: {', '.join(workbook.sheetnames)}); restore the original "
                "workbook"
            )
        rows = sheet.iter_rows(values_only=True)
        header = [_cell_text(v) for v in next(rows, ())]
        columns = {name: j for j, name in enumerate(header) if name}
        missing = [c for c in L.YAP_REQUIRED if c not in columns]
        if missing:
            raise DataError(
                f"{path}: sheet {sheet.title!r} lacks column(s) {', '.join(missing)} (header: "
                f"{', '.join(h for h in header if h)}); restore the original workbook"
            )
        table = []
        for values in rows:
            row = {name: _cell_text(values[j]) if j < len(values) else "" for name, j in columns.items()}
            if row["Image"]:
                table.append(row)
        return table
    finally:
        workbook.close()


@register_adapter
class Yap2018Adapter(Adapter):
    key = "yap2018"
    folder = "Yap2018"
    labels = ("benign", "malignant")
    layout = "original/NNNNNN.png, GT/NNNNNN.png and DatasetB.xlsx (the BUS/ folder of the release)"
    marks = (f"{L.YAP_IMAGE_DIR}/", f"{L.YAP_MASK_DIR}/")

    def list_samples(self, dataset_dir: Path) -> list[RawSample]:
        workbook = dataset_dir / L.YAP_XLSX
        table = MetadataTable(workbook, read_sheet(workbook), unit="row")
        images_dir, masks_dir = dataset_dir / L.YAP_IMAGE_DIR, dataset_dir / L.YAP_MASK_DIR
        samples: list[RawSample] = []
        for where, row in table:
            value = row["Image"]
            if not value.isdigit() or len(value) > 6:
                raise DataError(
                    f"{workbook}: {where} has Image {value!r}, not a number of up to 6 digits; fix it"
                )
            sample_id = value.zfill(6)
            table.add(sample_id, where)
            label = row["Type"].lower()
            if label not in self.labels:
                raise DataError(
                    f"{workbook}: {where} ({sample_id}) has Type {row['Type']!r}, not Benign/Malignant; fix it"
                )
            image_path = images_dir / f"{sample_id}.png"
            mask_path = masks_dir / f"{sample_id}.png"
            table.check_files(where, sample_id, image_path, mask_path)
            meta = {"Diagnosis": row["Diagnosis"]} if "Diagnosis" in row else {}
            samples.append(make_sample(sample_id, label, image_path, mask_path, meta=meta))
        for folder in (images_dir, masks_dir):
            table.check_folder(folder, by="stem")
        return samples
