"""Source layouts: which files are samples, and which class each one has.

Two layouts, told apart by `labels`:
- class per folder (ImageNet train: train/<wnid>/*.JPEG, or any such tree): the classes are the sorted folder
  names, which for ImageNet is the standard 1000-class index; files directly under the root have no label.
- a flat folder of images plus a label file (ImageNet validation): one line per file, `NAME LABEL` (space or
  comma separated; LOC_val_solution.csv works as is, its first word after the comma being the wnid). A label that
  is an integer is the class id; otherwise the classes are the sorted distinct labels, which for the 50,000
  ImageNet validation images are again the 1000 wnids in the standard order. Files without a line have no label.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    files: list[tuple[str, int]]  # (path relative to the root, class id), sorted by path
    classes: list[str]  # class id -> name
    unlabelled: int  # files that are samples of nothing: no class folder, no label line


def _walk(root: Path) -> list[str]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        found.extend(os.path.relpath(os.path.join(folder, n), root) for n in names if not n.startswith("."))
    return sorted(found)


def class_folders(root: Path) -> Source:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected ROOT/<class>/<image>, or pass --labels FILE)")
    ids = {name: i for i, name in enumerate(classes)}
    files, unlabelled = [], 0
    for rel in _walk(root):
        top = rel.split(os.sep, 1)[0]
        if os.sep in rel and top in ids:
            files.append((rel, ids[top]))
        else:
            unlabelled += 1
    return Source(files, classes, unlabelled)


def _read_labels(path: Path) -> dict[str, str]:
    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts or parts[0] == "ImageId":  # blank line, or the header of LOC_val_solution.csv
            continue
        if len(parts) < 2:
            raise ValueError(f"{path}:{number}: expected 'NAME LABEL', found {line!r}")
        labels[Path(parts[0]).stem] = parts[1]
    return labels


def flat_with_labels(root: Path, label_file: Path) -> Source:
    if not label_file.is_file():
        raise FileNotFoundError(f"label file not found: {label_file}")
    labels = _read_labels(label_file)
    if all(v.isdigit() for v in labels.values()):
        ids = {v: int(v) for v in labels.values()}
        classes = [str(i) for i in range(max(ids.values(), default=-1) + 1)]
    else:
        classes = sorted(set(labels.values()))
        ids = {name: i for i, name in enumerate(classes)}
    files, unlabelled = [], 0
    for rel in _walk(root):
        label = labels.get(Path(rel).stem)
        if label is None:
            unlabelled += 1
        else:
            files.append((rel, ids[label]))
    return Source(files, classes, unlabelled)


def scan(root: str, labels: str | None = None) -> Source:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"source folder not found or not a folder: {root}")
    return flat_with_labels(path, Path(labels)) if labels else class_folders(path)
