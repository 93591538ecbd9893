"""BUS-UCLM (Vallez et al. 2025): ``BUS-UCLM Breast ultrasound lesion segmentation dataset/BUS-UCLM/``.

Layout: ``images/<PPPP>_<NNN>.png`` (RGB 856x606), ``masks/`` with the same names, and ``INFO.csv``: UTF-8 with
BOM, ``;``-separated, header ``Image;Resolution;Label;Doppler;Marks;Combined``, labels Normal/Benign/Malignant.

Rules:

- ``patient_id`` is the 4-letter pseudonymised code before the underscore;
- masks are colour-coded and must hold only exact black (0,0,0) background, green (0,255,0) benign lesion and
  red (255,0,0) malignant lesion; any other colour raises a DataError naming the file. The class map comes from
  the colours;
- label rule, when INFO.csv's Label and the mask colours disagree: **the mask decides** (:func:`label_from_mask`).
  An empty mask is ``normal``, a green-only mask ``benign``, a red-only mask ``malignant``; a mask with both
  colours keeps a lesion Label and is otherwise named by the colour with more pixels. The mask is the ground truth
  every metric is computed against, so the label that sorts images into lesion and normal (lesion-only Dice, the
  normal-image false-positive rate) and stratifies the split must agree with it: a "Normal" row with lesion pixels
  would otherwise be a normal image whose lesion is scored, and a lesion row with an empty mask a lesion image with
  nothing to find. Relabelled samples are listed in :attr:`relabelled` and noted when decoded. On the 70-image
  shared sample of the release no row disagrees (28 Normal with empty masks, 21 Benign green-only, 21 Malignant
  red-only);
- Doppler/Marks/Combined are kept as metadata, normalised to Yes/No (the release has one stray ``Y``);
  ``exclude_doppler`` / ``exclude_marks`` / ``exclude_combined`` drop the rows flagged Yes (listed in
  :attr:`excluded`);
- HESN rule: the 13 ``HESN_*`` images are RGBA and smaller (608-792 x 468-489) than their 856x606 masks. Alpha is
  dropped. With ``hesn_rule="resize_mask"`` (default) any mask whose size differs from its image is resized to
  the image by nearest neighbour (labels stay exact) and a note records it; with ``hesn_rule="exclude"`` such
  samples are dropped at scan time (sizes read from the PNG headers) and listed in :attr:`excluded`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from busbench.data import layouts as L
from busbench.data.adapters.base import (
    Adapter,
    DecodedSample,
    MetadataTable,
    RawSample,
    fit_to_image,
    image_size,
    make_sample,
    open_image,
    read_image,
    read_table,
    register_adapter,
)
from busbench.errors import ConfigError, DataError

HESN_RULES = ("resize_mask", "exclude")
_YES_NO = {"yes": "Yes", "y": "Yes", "no": "No", "n": "No"}


def label_from_mask(class_map: np.ndarray, info_label: str) -> str:
    """The sample's label under the BUS-UCLM label rule (module docstring): the mask colours decide."""
    benign, malignant = int(np.count_nonzero(class_map == 1)), int(np.count_nonzero(class_map == 2))
    if benign and malignant:
        if info_label in ("benign", "malignant"):
            return info_label
        return "benign" if benign >= malignant else "malignant"
    if benign:
        return "benign"
    return "malignant" if malignant else "normal"


def decode_colour_mask(path: Path) -> np.ndarray:
    """Class map (0 background, 1 benign, 2 malignant) of a BUS-UCLM colour mask; other colours are an error."""
    image = open_image(path)
    if image.mode not in ("RGB", "RGBA", "P"):
        raise DataError(
            f"{path}: mask mode {image.mode!r}, expected an RGB colour mask (black/green/red); restore the original mask"
        )
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    code = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    class_map = np.zeros(code.shape, dtype=np.uint8)
    known = np.zeros(code.shape, dtype=bool)
    for (r, g, b), value in L.UCLM_COLOURS.items():
        hit = code == ((r << 16) | (g << 8) | b)
        class_map[hit] = value
        known |= hit
    if not known.all():
        bad = np.unique(code[~known])
        shown = ", ".join(str(((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255)) for c in bad[:3])
        raise DataError(
            f"{path}: {int((~known).sum())} pixels have colours other than black (0,0,0), green (0,255,0) or red "
            f"(255,0,0), e.g. {shown}; restore the original mask (it must not be resampled or re-encoded)"
        )
    return class_map


@register_adapter
class BusUclmAdapter(Adapter):
    key = "bus_uclm"
    folder = "BUS-UCLM"
    layout = "images/PPPP_NNN.png, masks/PPPP_NNN.png and INFO.csv (the BUS-UCLM/ folder inside the archive)"
    marks = ("images/", L.UCLM_INFO)

    def __init__(
        self,
        exclude_doppler: bool = False,
        exclude_marks: bool = False,
        exclude_combined: bool = False,
        hesn_rule: str = "resize_mask",
    ) -> None:
        super().__init__()
        if hesn_rule not in HESN_RULES:
            raise ConfigError(
                f"bus_uclm option hesn_rule={hesn_rule!r} is not one of {', '.join(HESN_RULES)}"
            )
        for name, value in (
            ("exclude_doppler", exclude_doppler),
            ("exclude_marks", exclude_marks),
            ("exclude_combined", exclude_combined),
        ):
            if not isinstance(value, bool):
                raise ConfigError(f"bus_uclm option {name}={value!r} must be true or false")
        self.exclude = {"Doppler": exclude_doppler, "Marks": exclude_marks, "Combined": exclude_combined}
        self.hesn_rule = hesn_rule
        #: sample id -> (INFO.csv label, label given by the mask colours) where they disagree (set by scan)
        self.relabelled: dict[str, tuple[str, str]] = {}

    def options(self) -> dict[str, Any]:
        return {
            "exclude_doppler": self.exclude["Doppler"],
            "exclude_marks": self.exclude["Marks"],
            "exclude_combined": self.exclude["Combined"],
            "hesn_rule": self.hesn_rule,
        }

    def list_samples(self, dataset_dir: Path) -> list[RawSample]:
        self.relabelled = {}
        info = dataset_dir / L.UCLM_INFO
        required = L.UCLM_REQUIRED + tuple(flag for flag, on in self.exclude.items() if on)
        table = MetadataTable(info, read_table(info, ";", required))
        images_dir, masks_dir = dataset_dir / "images", dataset_dir / "masks"
        samples: list[RawSample] = []
        for where, row in table:
            name = row["Image"]
            match = L.UCLM_NAME_RE.match(name)
            if match is None:
                raise DataError(f"{info}: {where} names {name!r}, not 'PPPP_NNN.png'; fix the row")
            table.add(name, where)
            label = L.UCLM_LABELS.get(row["Label"].capitalize())
            if label is None:
                raise DataError(
                    f"{info}: {where} ({name}) has Label {row['Label']!r}, not Normal/Benign/Malignant; fix the row"
                )
            meta = {}
            for flag in L.UCLM_FLAGS:
                if flag not in row:
                    continue
                value = _YES_NO.get(row[flag].lower())
                if value is None:
                    raise DataError(
                        f"{info}: {where} ({name}) has {flag} {row[flag]!r}, not Yes/No; fix the row"
                    )
                meta[flag] = value
            if "Resolution" in row:
                meta["Resolution"] = row["Resolution"]
            image_path, mask_path = images_dir / name, masks_dir / name
            table.check_files(where, name, image_path, mask_path)
            sample_id = name[: -len(".png")]
            flagged = [flag for flag, on in self.exclude.items() if on and meta.get(flag) == "Yes"]
            if flagged:
                self.excluded[sample_id] = f"{'/'.join(flagged)} image (exclude_{flagged[0].lower()})"
                continue
            if self.hesn_rule == "exclude":
                img_size, mask_size = image_size(image_path), image_size(mask_path)
                if img_size != mask_size:
                    self.excluded[sample_id] = (
                        f"image {img_size[0]}x{img_size[1]} differs from its mask {mask_size[0]}x{mask_size[1]} "
                        "(hesn_rule=exclude)"
                    )
                    continue
            by_mask = label_from_mask(decode_colour_mask(mask_path), label)
            if by_mask != label:
                self.relabelled[sample_id] = (label, by_mask)
                label = by_mask
            samples.append(
                make_sample(sample_id, label, image_path, mask_path, patient_id=match["patient"], meta=meta)
            )
        for folder in (images_dir, masks_dir):
            table.check_folder(folder)
        if not samples:
            raise DataError(
                f"bus_uclm: every row of {info} was excluded by the options {self.options()}; relax them"
            )
        return samples

    def decode(self, sample: RawSample) -> DecodedSample:
        image, notes = read_image(sample.image_path)
        mask_path = sample.mask_paths[0]
        class_map = decode_colour_mask(mask_path)
        shape = image.shape[:2]
        if class_map.shape != shape and self.hesn_rule == "exclude":
            raise DataError(
                f"{mask_path}: mask {class_map.shape[1]}x{class_map.shape[0]} differs from its image "
                f"{shape[1]}x{shape[0]} and hesn_rule=exclude; scan() drops such samples, so rescan the dataset"
            )
        class_map, fit_notes = fit_to_image(class_map, shape, mask_path, " (hesn_rule=resize_mask)")
        notes.extend(fit_notes)
        relabelled = self.relabelled.get(sample.sample_id)
        if relabelled is not None:
            notes.append(
                f"{mask_path.name}: INFO.csv says {relabelled[0].capitalize()} but the mask colours say "
                f"{relabelled[1]}; labelled {relabelled[1]} (the mask decides)"
            )
        values = set(np.unique(class_map).tolist()) - {0}
        expected = {"normal": set(), "benign": {1}, "malignant": {2}}[sample.label]
        if values - expected:
            found = "/".join({1: "green (benign)", 2: "red (malignant)"}[v] for v in sorted(values))
            notes.append(
                f"{mask_path.name}: INFO.csv says {sample.label.capitalize()} but the mask has {found} pixels; "
                "the mask colours are used for the class map"
            )
        return DecodedSample(image=image, mask=class_map > 0, class_map=class_map, notes=notes)
