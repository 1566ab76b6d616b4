"""The labelled text data: read and check a CSV (``text``, ``label``, ``split``), carve a validation split from train.

The default is the packaged Debian data set (``lsrfx/data/debian_sections_apps.csv``). ``test`` rows are only used
for the final evaluation; validation comes out of ``train`` (stratified per label, seeded), so nothing is ever tuned
on test.

The CSV is read as UTF-8 with or without a byte-order mark (spreadsheets' "CSV UTF-8" writes one), and a text field
may be up to :data:`MAX_FIELD_CHARS` long (the ``csv`` module's own limit, 128 Ki characters, would refuse a long
document that the tokenizer simply truncates to ``--max-length`` tokens).
"""

from __future__ import annotations

import contextlib
import csv
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lsrfx.finetune.errors import FinetuneError

REQUIRED_COLUMNS = ("text", "label", "split")
# The longest field read, in characters: far beyond any text worth classifying (only the first --max-length tokens are
# used), small enough that a runaway field cannot take all memory.
MAX_FIELD_CHARS = 64 * 2**20


def default_data_path() -> Path:
    """The packaged Debian sections data set."""
    return Path(str(resources.files("lsrfx") / "data" / "debian_sections_apps.csv"))


@dataclass(frozen=True)
class Split:
    """Texts and integer labels of one split."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextData:
    """The three splits and the label names (index = class id)."""

    label_names: list[str]
    train: Split
    validation: Split
    test: Split

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's rows, after checking the file exists, has the needed columns and is well formed: a CSV error (an
    unterminated quote, stray characters after a closing quote) or a record with more or fewer fields than the
    header is reported with its line, never swallowed into an odd row."""
    if not path.is_file():
        raise FinetuneError(f"data file {str(path)!r} does not exist; pass --data with a CSV (columns text, label, split).")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f, field_limit(MAX_FIELD_CHARS):
            reader = csv.reader(f, strict=True)
            columns = _next_record(reader, path)[1] or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise FinetuneError(
                    f"data file {str(path)!r} lacks column(s) {missing}; it has {columns}, needs {list(REQUIRED_COLUMNS)}."
                )
            rows = []
            while True:
                line, record = _next_record(reader, path)
                if record is None:
                    return rows
                if not record:
                    continue  # a blank line
                if len(record) != len(columns):
                    raise FinetuneError(
                        f"data file {str(path)!r}, line {line}: {len(record)} fields where the header has "
                        f"{len(columns)} ({', '.join(columns)}); quote fields that contain commas."
                    )
                rows.append(dict(zip(columns, record, strict=True)))
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"data file {str(path)!r} is not a readable UTF-8 CSV: {exc}.") from exc


@contextlib.contextmanager
def field_limit(chars: int) -> Iterator[None]:
    """``csv.field_size_limit(chars)`` inside the block (the limit is process-wide), then the previous limit."""
    previous = csv.field_size_limit(chars)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _next_record(reader, path: Path) -> tuple[int, list[str] | None]:
    """The line the next record of a strict ``csv.reader`` starts on, and the record (``None`` at the end); a CSV
    error names that line."""
    start = reader.line_num + 1
    try:
        return start, next(reader)
    except StopIteration:
        return start, None
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise FinetuneError(f"data file {str(path)!r}: record starting at line {start} has a field longer than "
                                f"{csv.field_size_limit():,} characters, the most lsrfx reads; shorten it (only the "
                                "first --max-length tokens of a text are used).") from exc
        hint = ("a quote opened in this record is never closed: close it, or double the quotes inside a quoted "
                "field" if "unexpected end of data" in str(exc) else "quote the field and double the quotes inside it")
        raise FinetuneError(f"data file {str(path)!r} is not valid CSV: record starting at line {start}: {exc} "
                            f"({hint}).") from exc


def load_data(path: Path | None = None, *, validation_fraction: float = 0.15, seed: int = 0) -> TextData:
    """Read ``path`` (default: the packaged data set), check it, and split train into train and validation."""
    path = Path(path) if path is not None else default_data_path()
    rows = read_rows(path)
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for row in rows:
        split = (row["split"] or "").strip().lower()
        if split in by_split and (row["text"] or "").strip():
            by_split[split].append((row["text"].strip(), (row["label"] or "").strip()))
    train, test = by_split["train"], by_split["test"]
    if not train or not test:
        seen = sorted({(row["split"] or "").strip() for row in rows})
        raise FinetuneError(
            f"data file {str(path)!r} needs rows with split 'train' and 'test' (found {len(train)} train, "
            f"{len(test)} test among {len(rows)} rows; split values seen: {seen[:8]})."
        )
    counts = Counter(label for _, label in train)
    if len(counts) < 2:
        raise FinetuneError(f"data file {str(path)!r} has a single class in its train split ({list(counts)}); "
                            "classification needs at least two labels.")
    unseen = sorted({label for _, label in test} - set(counts))
    if unseen:
        raise FinetuneError(f"data file {str(path)!r}: test labels {unseen} never occur in train.")
    names = sorted(counts)
    index = {n: i for i, n in enumerate(names)}
    fit, held = stratified_split(train, validation_fraction, seed)
    if not held:
        raise FinetuneError(f"data file {str(path)!r}: train split too small ({len(train)} rows) to carve out a "
                            "validation split.")

    def encode(pairs: list[tuple[str, str]]) -> Split:
        return Split([t for t, _ in pairs], [index[label] for _, label in pairs])

    return TextData(names, encode(fit), encode(held), encode(test))


def stratified_split(pairs: list[tuple[str, str]], fraction: float, seed: int
                     ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(kept, held_out)``: about ``fraction`` of each label's rows held out (at least one if it has two or more)."""
    rng = random.Random(seed)
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        groups.setdefault(pair[1], []).append(pair)
    kept, held = [], []
    for label in sorted(groups):
        group = groups[label][:]
        rng.shuffle(group)
        n = min(len(group) - 1, max(1, round(fraction * len(group)))) if len(group) > 1 else 0
        held += group[:n]
        kept += group[n:]
    rng.shuffle(kept)
    return kept, held
