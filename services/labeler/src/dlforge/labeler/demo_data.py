"""The ELPV demo data set as a folder the labeler ingests.

ELPV (the ``elpv-dataset`` package: 2,624 grayscale 300x300 electroluminescence images of solar
cells, mono- and polycrystalline, each with a defect probability in {0, 1/3, 2/3, 1}) becomes a
flat folder of PNGs plus ``labels.csv`` with columns ``file,label,domain``. The label column is
EMPTY for every row: the pipeline has to label the images itself. The ground truth
(defect = probability >= 0.5 -> "defect", else "good") is returned for the simulated annotator
and for scoring the auto-labels; ``domain`` keeps the cell type ("mono"/"poly").
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlforge.common.errors import ConfigError

DEFECT = "defect"
GOOD = "good"
THRESHOLD = 0.5


@dataclass(frozen=True)
class ElpvCell:
    name: str
    probability: float
    kind: str

    @property
    def label(self) -> str:
        return DEFECT if self.probability >= THRESHOLD else GOOD


def elpv_root() -> Path:
    """The folder holding ``labels.csv`` and ``images/`` of the installed elpv-dataset package."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise ConfigError("the ELPV demo needs the elpv-dataset package: pip install elpv-dataset") from exc
    root = Path(elpv_dataset.__file__).resolve().parent / "data"
    if not (root / "labels.csv").is_file():
        raise ConfigError(f"elpv-dataset is installed but {root / 'labels.csv'} is missing")
    return root


def elpv_cells() -> list[ElpvCell]:
    """Every ELPV cell as listed by the package (path, defect probability, type)."""
    cells = []
    for line in (elpv_root() / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            cells.append(ElpvCell(name=parts[0], probability=float(parts[1]), kind=parts[2]))
    return cells


def materialize_elpv(
    folder: str | Path, *, limit: int | None = None, seed: int = 0, with_domain: bool = True
) -> dict[str, str]:
    """Write ELPV into ``folder`` (PNGs + ``labels.csv`` with an empty label column); return name -> label.

    ``limit`` keeps a random, class-stratified subset of that many images (quick runs).
    The folder is rewritten from scratch.
    """
    cells = elpv_cells()
    if limit is not None and limit < len(cells):
        rng = np.random.default_rng(seed)
        chosen: list[int] = []
        for label in (DEFECT, GOOD):
            members = [i for i, c in enumerate(cells) if c.label == label]
            share = round(limit * len(members) / len(cells))
            chosen += [int(i) for i in rng.choice(members, size=min(share, len(members)), replace=False)]
        cells = [cells[i] for i in sorted(chosen)]
    out = Path(folder)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = elpv_root()
    truth: dict[str, str] = {}
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "domain"] if with_domain else ["file", "label"])
        for cell in cells:
            name = Path(cell.name).name
            shutil.copyfile(src / cell.name, out / name)
            writer.writerow([name, "", cell.kind] if with_domain else [name, ""])
            truth[name] = cell.label
    return truth
