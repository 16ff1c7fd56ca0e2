"""Labels of HER2 scores as data sets write them, in labels CSVs and class-folder names: one reading for
training and evaluation alike."""
from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TRUTH_LEVELS", "FOLDER_NAMES", "parse_truth_label", "parse_score", "row_label", "read_csv_rows", "class_folders",
           "class_folder_files"]

log = logging.getLogger(__name__)

TRUTH_LEVELS: dict[str, tuple[str, str | None]] = {
    "0": ("0", None),
    "null": ("0", "0 (null)"), "0 (null)": ("0", "0 (null)"), "0null": ("0", "0 (null)"),
    "0+": ("0", "0+ (ultralow)"), "ultralow": ("0", "0+ (ultralow)"), "0+ (ultralow)": ("0", "0+ (ultralow)"),
    "0plus": ("0", "0+ (ultralow)"),
    "1+": ("1+", "1+"), "1plus": ("1+", "1+"), "2+": ("2+", "2+"), "2plus": ("2+", "2+"),
    "3+": ("3+", "3+"), "3plus": ("3+", "3+"),
}
"""Accepted label spellings (case-insensitive) -> (score, report level; None for a plain 0)."""

FOLDER_NAMES = "0, null, 0+ (or ultralow), 1+, 2+, 3+ (or 1plus...)"
"""The class-folder names class_folder_files takes by default, in words."""


def parse_truth_label(value: str) -> tuple[str, str | None]:
    """(score, report level) of a label: 0 / null / 0+ (ultralow) / 1+ / 2+ / 3+ (see TRUTH_LEVELS), in any case
    and spacing ("3 +", "0+(ultralow)"), "ultra-low" for ultralow, and 1 / 2 / 3 for 1+ / 2+ / 3+ (as many
    data sets write them)."""
    key = "".join(str(value).lower().replace("ultra-low", "ultralow").split()).replace("(", " (")  # "3 +": "3+"
    key = {"1": "1+", "2": "2+", "3": "3+"}.get(key, key)
    if key not in TRUTH_LEVELS:
        raise ValueError(f"unknown label {value!r}; use one of 0, null, 0+ (or ultralow), 1+, 2+, 3+")
    return TRUTH_LEVELS[key]


def row_label(row: dict[str, str]) -> tuple[str, str | None]:
    """(score, report level) of a labels row: its ``label`` (parse_truth_label) and, where given, its five-level
    ``level`` column beside a 4-class label (as synth writes both); ValueError where the two disagree."""
    score, level = parse_truth_label(row["label"])
    if row.get("level"):
        level_score, column_level = parse_truth_label(row["level"])
        if level_score != score or (level is not None and column_level not in (None, level)):
            raise ValueError(f"level {row['level']!r} does not agree with label {row['label']!r}")
        level = column_level or level
    return score, level


def parse_score(value: str) -> str:
    """The score ("0", "1+", "2+", "3+") of a label (parse_truth_label: null and ultralow are 0); ValueError otherwise."""
    return parse_truth_label(value)[0]


def read_csv_rows(p: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of a labels CSV as (line, {column: value}), column names stripped and read in any case (path,
    label, level, ish, eligible, count_<category>, eligible_<rule>; a rule's name kept as written), its columns
    separated by commas, or by semicolons or tabs where its header is, or as a first line "sep=;" (Excel's) says. Columns
    without a name (the empty ones a spreadsheet's export adds) are left out; a value in one is an error."""
    def column(name: str | None) -> str:
        name = (name or "").strip()
        return "eligible_" + name[len("eligible_"):] if name.lower().startswith("eligible_") else name.lower()

    with open(p, newline="", encoding="utf-8-sig") as fh:
        head = fh.readline()
        # Excel's line naming the separator (as a tool that ignores it may re-save it: quoted, or followed by separators)
        excel = re.fullmatch(r'"?sep=([,;\t|]?)"?[,;\t]*\s*', head, re.IGNORECASE)
        start, skipped = (fh.tell(), 1) if excel else (0, 0)
        if excel and excel[1]:
            delimiter = excel[1]
        else:  # the header's own: a spreadsheet where the comma is the decimal mark writes semicolons; tab-separated text
            header = fh.readline() if excel else head
            delimiter = next((d for d in ",;\t" if {"path", "label"} <= {
                column(c) for c in next(csv.reader([header], delimiter=d), [])}), ",")
        fh.seek(start)
        reader = csv.DictReader(fh, delimiter=delimiter)
        names = [column(c) for c in reader.fieldnames or []]
        if not {"path", "label"} <= set(names):
            raise ValueError(f"{p}: needs a header with columns 'path' and 'label' (separated by commas, semicolons or "
                             f"tabs), found {[c for c in names if c][:6]}")
        if repeated := sorted({c for c in names if c and names.count(c) > 1}):
            raise ValueError(f"{p}: the header names {repeated} more than once (column names are read in any case)")
        reader.fieldnames = [c or f"\0{i}" for i, c in enumerate(names)]  # unnamed columns apart, each its own key
        rows = []
        for r in reader:  # reader.line_num: the file's line the row ends on (blank lines and quoted line breaks count)
            if None in r:
                raise ValueError(f"{p}, line {reader.line_num + skipped}: more fields than the header has columns ({r[None]})")
            if unnamed := [v for k, v in r.items() if k.startswith("\0") and (v or "").strip()]:
                raise ValueError(f"{p}, line {reader.line_num + skipped}: {unnamed[0]!r} lies in a column without a name in the header")
            rows.append((reader.line_num + skipped, {k: (v or "").strip() for k, v in r.items() if not k.startswith("\0")}))
    return rows


def class_folders(root: str | os.PathLike, parse: Callable[[str], Any] = parse_score) -> tuple[list[tuple[Path, Any]], list[str]]:
    """(sub-folder, ``parse(its name)``) for each sub-folder of ``root`` whose name ``parse`` takes, and the names of
    the others."""
    labelled, others = [], []
    for sub in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        try:
            labelled.append((sub, parse(sub.name)))
        except ValueError:
            others.append(sub.name)
    return labelled, others


def class_folder_files(root: str | os.PathLike, parse: Callable[[str], Any] = parse_score,
                       names: str = FOLDER_NAMES) -> list[tuple[Path, Any]]:
    """(image, ``parse(folder name)``) pairs from the class sub-folders of ``root`` (``names``: the
    folder names ``parse`` takes); other sub-folders are skipped with a warning, and so are hidden files and folders (a
    Mac's ._field.png beside field.png), links to nothing, and her2score's own overlays (batch.output_holding: an
    overlay.png beside another of a slide's outputs is a drawing of it). ValueError when there is no image."""
    from .batch import output_holding
    from .files import visible_files
    from .slide import SLIDE_SUFFIXES

    root = Path(root)
    labelled, others = class_folders(root, parse)
    for name in others:
        log.warning("%s: not a class folder (%s); skipped", root / name, names)
    out = []
    for sub, label in labelled:
        images = [p for p in visible_files(sub) if p.suffix.lower() in SLIDE_SUFFIXES and not output_holding(p)]
        for gone in (p for p in images if not p.is_file()):
            log.warning("%s: a link to nothing; skipped", gone)
        out += [(f, label) for f in sorted(p for p in images if p.is_file())]
    if not out:
        raise ValueError(f"{root}: no images in class sub-folders named {names}")
    return out
