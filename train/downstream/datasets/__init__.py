"""Downstream face datasets in their official on-disk formats (FaRL's fine-tuning benchmarks).

Uniform interface (see ``common.py`` for the conventions)::

    ds = open_dataset("wflw", root, "test")     # or DATASETS["wflw"](root, "test")
    len(ds); item = ds[i]; ds.subsets()         # {"full": indices, ...}
    ds.task                                      # "parsing" | "alignment" | "attributes"

Parsing datasets (``labels``: names, 0 = background) give "image", "label", "path" (LaPa also
"landmarks", 106 points); alignment datasets (``num_points``) give "image", "landmarks",
"box", "path" (AFLW-19 also "visible"); attribute datasets (``attribute_names``) give "image",
"attributes" (0 / 1 floats), "path". Bad or missing files raise :class:`DatasetError`.
"""

from __future__ import annotations

from .aflw19 import AFLW19
from .celeba_attr import CelebAAttributes
from .celebamask_hq import CelebAMaskHQ
from .common import DatasetError, FaceDataset, MissingFileError
from .lapa import LaPa
from .lfwa import LFWAttributes
from .w300 import W300
from .wflw import WFLW

DATASETS: dict[str, type[FaceDataset]] = {
    "celebamask_hq": CelebAMaskHQ,
    "lapa": LaPa,
    "300w": W300,
    "wflw": WFLW,
    "aflw19": AFLW19,
    "celeba_attr": CelebAAttributes,
    "lfwa": LFWAttributes,
}


def open_dataset(name: str, root: str, split: str) -> FaceDataset:
    """Open dataset ``name`` (a key of :data:`DATASETS`) at ``root`` for ``split``."""
    try:
        cls = DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}") from None
    return cls(root, split)


__all__ = ["AFLW19", "CelebAAttributes", "CelebAMaskHQ", "DATASETS", "DatasetError", "FaceDataset", "LaPa",
           "LFWAttributes", "MissingFileError", "W300", "WFLW", "open_dataset"]
