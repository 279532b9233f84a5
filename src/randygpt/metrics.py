"""The run directory's metrics.csv: its columns, how a row is written, and how it is read back.

One row per log interval: the iteration, the mean training loss over the interval, the
validation loss where an evaluation ran (empty otherwise), the learning rate, tokens per second
(empty on the row of the untrained model), the seconds since the run started, and the
validation loss in bits per character (empty with val_loss; the measure that compares
tokenizers, see data.Dataset.bits_per_char). The trainer
writes it, the plot and the run comparison read it; the format lives here alone.
"""
import csv
import math
from pathlib import Path

import numpy as np

__all__ = ["METRICS_HEADER", "MetricsError", "MetricsFile", "metrics_row", "read_metrics"]

METRICS_HEADER = ("iter", "train_loss", "val_loss", "lr", "tok_per_s", "elapsed_s", "val_bpc")
# The header before val_bpc was added: a resumed run keeps such a file's rows (their val_bpc
# empty), and read_metrics reads it as it is.
_OLD_HEADER = METRICS_HEADER[:-1]
# The columns a reader cannot do without.
_REQUIRED = ("iter", "train_loss", "val_loss", "lr")


class MetricsError(ValueError):
    """A metrics.csv cannot be read (missing, malformed); the message is one line naming it."""


def metrics_row(step, train_loss, val_loss, lr, tok_per_s, elapsed_s, val_bpc=None):
    """One row of METRICS_HEADER's columns. val_loss and val_bpc are None on rows without an
    evaluation, tok_per_s None before the first step; their cells stay empty, so a plot shows
    only measured points."""
    return [step, f"{train_loss:.6f}", "" if val_loss is None else f"{val_loss:.6f}",
            f"{lr:.6e}", "" if tok_per_s is None else f"{tok_per_s:.1f}", f"{elapsed_s:.3f}",
            "" if val_bpc is None else f"{val_bpc:.6f}"]


class MetricsFile:
    """metrics.csv opened for a run: rows are flushed as they are written, so the file is
    always a readable curve, even if the run dies.

    keep_until : None for a fresh run (the file starts empty); for a resumed run, the
                 checkpoint's step: rows up to it are kept, later ones (logged by a run that
                 died before it could save) are dropped, so the file stays one curve.
    """

    def __init__(self, path, keep_until=None):
        self.path = Path(path)
        rows = _rows_up_to(self.path, keep_until) if keep_until is not None else []
        # A resumed run's clock goes on from the last kept row: elapsed_s stays cumulative.
        self.last_elapsed = _last_elapsed(rows)
        self._file = open(self.path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(METRICS_HEADER)
        self._writer.writerows(rows)
        self._file.flush()

    def write(self, *fields):
        """Append one row (metrics_row's arguments) and flush it."""
        self._writer.writerow(metrics_row(*fields))
        self._file.flush()

    @property
    def closed(self):
        return self._file.closed

    def close(self):
        self._file.close()


def _last_elapsed(rows):
    k = METRICS_HEADER.index("elapsed_s")
    for row in reversed(rows):
        try:
            return float(row[k])
        except (IndexError, ValueError):
            continue
    return 0.0


def _rows_up_to(path, step):
    """The rows of an existing metrics.csv whose iteration is <= step (none if the file is
    missing or has another header)."""
    rows = []
    if not path.is_file():
        return rows
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) not in (METRICS_HEADER, _OLD_HEADER):
            return rows
        pad = [""] * (len(METRICS_HEADER) - len(header))
        for row in reader:
            try:
                if row and int(row[0]) <= step:
                    rows.append(row + pad)
            except ValueError:
                continue
    return rows


def read_metrics(path):
    """Read a metrics.csv into {column: float64 array}; empty cells (val_loss on rows without an
    evaluation) become NaN. Raises MetricsError naming the file (and line) when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{str(path)!r} does not exist" if not path.exists()
                           else f"{str(path)!r} is not a file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MetricsError(f"cannot read {str(path)!r}: {e}") from None
    if not rows:
        raise MetricsError(f"{str(path)!r} is empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise MetricsError(f"{str(path)!r} lacks the column(s) {', '.join(missing)} "
                           f"(expected {','.join(METRICS_HEADER)})")
    data = {name: [] for name in header}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise MetricsError(f"{str(path)!r} line {lineno}: {len(row)} fields, expected "
                               f"{len(header)}")
        for name, cell in zip(header, row):
            cell = cell.strip()
            try:
                data[name].append(float(cell) if cell else math.nan)
            except ValueError:
                raise MetricsError(f"{str(path)!r} line {lineno}: {name} is not a number: "
                                   f"{cell!r}") from None
    if not data["iter"]:
        raise MetricsError(f"{str(path)!r} has no rows yet")
    return {name: np.array(values, dtype=np.float64) for name, values in data.items()}
