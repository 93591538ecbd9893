"""Facts about the six raw dataset layouts, shared by the synthetic-data writer and the adapters.

Keeping names, patterns, headers and colours in one place means the synthetic data and the readers cannot drift
apart silently: a test that writes a layout and reads it back exercises both against the same facts.
"""

from __future__ import annotations

import re

LAYOUT_KEYS: tuple[str, ...] = ("busi", "curated_busi", "busbra", "bus_uc", "bus_uclm", "yap2018")

# BUSI: Dataset_BUSI_with_GT/{benign,malignant,normal}/"<cls> (<n>).png" + "_mask.png" + optional "_mask_<k>.png".
BUSI_ARCHIVE_DIR = "Dataset_BUSI_with_GT"
BUSI_CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")
BUSI_FILE_RE = re.compile(
    r"^(?P<cls>benign|malignant|normal) \((?P<n>\d+)\)(?P<mask>_mask(?:_(?P<k>\d+))?)?\.png$"
)


def busi_image_name(cls: str, n: int) -> str:
    return f"{cls} ({n}).png"


def busi_mask_name(cls: str, n: int, k: int = 0) -> str:
    """``k = 0`` is the primary ``_mask``; ``k >= 1`` the extra ``_mask_<k>`` files."""
    return f"{cls} ({n})_mask.png" if k == 0 else f"{cls} ({n})_mask_{k}.png"


def busi_sample_id(cls: str, n: int) -> str:
    return f"{cls}_{n:04d}"


# Curated BUSI, Zenodo release: "Curated BUSI/"{images/<cls>_id_<n>.png, masks/<cls>_id_<n>_mask.png}.
CURATED_ARCHIVE_DIR = "Curated BUSI"
CURATED_IMAGE_RE = re.compile(r"^(?P<cls>benign|malignant|normal)_id_(?P<n>\d+)\.png$")
CURATED_MASK_RE = re.compile(r"^(?P<cls>benign|malignant|normal)_id_(?P<n>\d+)_mask\.png$")
CURATED_KEEP_LIST = "curated_busi_ids.csv"  # package data beside this module
CURATED_KEEP_LIST_SHA256 = "4aa2096b4b8ef34d3dc03ddcd513f059020601ef89f2dc06741214f1e197f848"
CURATED_SIZE = 128  # the published preprocessing script's output size


def curated_image_name(cls: str, n: int) -> str:
    return f"{cls}_id_{n}.png"


def curated_mask_name(cls: str, n: int) -> str:
    return f"{cls}_id_{n}_mask.png"


# BUS-BRA: BUSBRA/{Images/bus_NNNN-s.png, Masks/mask_NNNN-s.png, bus_data.csv, 5-fold-cv.csv, 10-fold-cv.csv, LICENSE.txt}.
BUSBRA_ARCHIVE_DIR = "BUSBRA"
BUSBRA_ID_RE = re.compile(r"^bus_(?P<case>\d{4})-(?P<side>[lrs])$")
BUSBRA_DATA_CSV = "bus_data.csv"
BUSBRA_COLUMNS: tuple[str, ...] = (
    "ID",
    "Case",
    "Histology",
    "Pathology",
    "BIRADS",
    "Device",
    "Width",
    "Height",
    "Side",
    "BBOX",
)
BUSBRA_REQUIRED: tuple[str, ...] = ("ID", "Case", "Pathology")
BUSBRA_FOLD_FILES: dict[int, str] = {5: "5-fold-cv.csv", 10: "10-fold-cv.csv"}
BUSBRA_SIDES: dict[str, str] = {"l": "left", "r": "right", "s": "single"}


def busbra_mask_name(sample_id: str) -> str:
    """The authors' rule: ``"mask" + ID(4:end)``, so ``bus_0001-l`` -> ``mask_0001-l.png``."""
    return "mask" + sample_id[3:] + ".png"


# BUS-UC: BUS_UC/BUS_UC/{All,Benign,Malignant}/{images,masks}/<name>.png, mask under the image's name.
BUS_UC_ARCHIVE_DIRS: tuple[str, ...] = ("BUS_UC", "BUS_UC")
BUS_UC_CLASSES: dict[str, str] = {"Benign": "benign", "Malignant": "malignant"}
BUS_UC_UNION = "All"

# BUS-UCLM: "BUS-UCLM Breast ultrasound lesion segmentation dataset/BUS-UCLM/"{images,masks,INFO.csv}.
UCLM_ARCHIVE_DIRS: tuple[str, ...] = ("BUS-UCLM Breast ultrasound lesion segmentation dataset", "BUS-UCLM")
UCLM_NAME_RE = re.compile(r"^(?P<patient>[A-Z]{4})_(?P<n>\d{3})\.png$")
UCLM_INFO = "INFO.csv"
UCLM_COLUMNS: tuple[str, ...] = ("Image", "Resolution", "Label", "Doppler", "Marks", "Combined")
UCLM_REQUIRED: tuple[str, ...] = ("Image", "Label")
UCLM_FLAGS: tuple[str, ...] = ("Doppler", "Marks", "Combined")
UCLM_LABELS: dict[str, str] = {"Normal": "normal", "Benign": "benign", "Malignant": "malignant"}
UCLM_COLOURS: dict[tuple[int, int, int], int] = {(0, 0, 0): 0, (0, 255, 0): 1, (255, 0, 0): 2}
"""Exact mask colours -> class-map value: black background, green benign lesion, red malignant lesion."""
UCLM_RESOLUTION = (856, 606)  # (width, height) of every image except the HESN patient's

# Yap2018 / UDIAT Dataset B: BUS/{original,GT}/NNNNNN.png + BUS/DatasetB.xlsx (sheet Hoja1).
YAP_ARCHIVE_DIR = "BUS"
YAP_IMAGE_DIR = "original"
YAP_MASK_DIR = "GT"
YAP_XLSX = "DatasetB.xlsx"
YAP_SHEET = "Hoja1"
YAP_NAME_RE = re.compile(r"^(?P<n>\d{6})\.png$")
YAP_REQUIRED: tuple[str, ...] = ("Image", "Type")

# Generic folder layout (``busbench prepare --layout folder --key NAME``): DIR/{images/, masks/, meta.csv}.
FOLDER_IMAGE_DIR = "images"
FOLDER_MASK_DIR = "masks"
FOLDER_META = "meta.csv"
FOLDER_META_REQUIRED: tuple[str, ...] = ("sample_id", "patient_id", "label")
FOLDER_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FOLDER_MASK_SUFFIXES: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff")  # lossless only
FOLDER_LESION = 255
"""Mask value of a lesion pixel whose class is the image's label (binary masks: 0 background, 255 lesion); class
maps use the manifest's class-map values instead (0 background, 1 benign, 2 malignant)."""
