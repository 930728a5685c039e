"""NUS-WIDE in the list-file layout of the deep-hashing community.

ROOT/nus-wide/ holds the images (any sub-folders) and list files whose rows are
`relative/path.jpg l1 l2 ... l21` (0/1 for each of the 21 most frequent concepts). The split files
are named `database.txt`, `train.txt` and `test.txt`; `all` reads `database.txt` then `test.txt`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vdsh.data.cache import cached_imageset, fingerprint
from vdsh.data.folder import decode_images
from vdsh.data.imageset import ImageSet
from vdsh.data.info import DatasetInfo
from vdsh.data.paths import DatasetNotFoundError

FOLDER = "nus-wide"
# The 21 most frequent concepts, in the order the usual list files use.
CONCEPTS_21 = [
    "animal", "beach", "buildings", "clouds", "flowers", "grass", "lake", "mountain", "ocean", "person",
    "plants", "reflection", "road", "rocks", "sky", "snow", "sunset", "tree", "vehicle", "water", "window",
]
INFO = DatasetInfo("nuswide", None, None, tuple(CONCEPTS_21), "photos",
                   "multi-label Flickr photos listed in database.txt then test.txt, decoded at a chosen size")
SPLIT_FILES = {"database": ["database.txt"], "train": ["train.txt"], "test": ["test.txt"], "all": ["database.txt", "test.txt"]}


def read_list_file(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse `relative/path l1 ... lL` rows into paths and a uint8 multi-hot matrix."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"NUS-WIDE list file {path} not found: expected {path.parent}/{{database,train,test}}.txt with rows "
            f"'relative/image.jpg l1 ... l21' beside the images (set --data-root or $VDSH_DATA)."
        )
    paths, rows = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, *flags = line.split()
        if not flags or any(f not in ("0", "1") for f in flags):
            raise DatasetNotFoundError(f"{path}:{number}: expected 'path l1 ... lL' with 0/1 labels, got {line[:80]!r}")
        if rows and len(flags) != len(rows[0]):
            raise DatasetNotFoundError(f"{path}:{number}: {len(flags)} labels, earlier rows have {len(rows[0])}")
        paths.append(name)
        rows.append([int(f) for f in flags])
    if not rows:
        raise DatasetNotFoundError(f"{path} lists no images")
    return paths, np.asarray(rows, dtype=np.uint8)


def load_nuswide(root: Path, split: str = "all", channels: int = 3, size: int = 64) -> ImageSet:
    """NUS-WIDE images listed in the split's list files, decoded at size x size and cached."""
    if split not in SPLIT_FILES:
        raise ValueError(f"NUS-WIDE split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    folder = root / FOLDER
    lists = [read_list_file(folder / name) for name in SPLIT_FILES[split]]
    relative = [p for paths, _ in lists for p in paths]
    labels = np.concatenate([rows for _, rows in lists])
    paths = [folder / p for p in relative]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} NUS-WIDE images listed but missing, e.g. {missing[0]}")
    names = CONCEPTS_21 if labels.shape[1] == len(CONCEPTS_21) else [f"concept{i}" for i in range(labels.shape[1])]

    def build() -> ImageSet:
        return ImageSet("nuswide", decode_images(paths, channels, size), labels, names, [str(p) for p in paths])

    key = fingerprint([folder / n for n in SPLIT_FILES[split]], split=split, channels=channels, size=size, n=len(paths))
    return cached_imageset("nuswide-" + key, build)
