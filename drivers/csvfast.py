"""pandas' C parser for numeric CSV blocks: about 5x ``np.loadtxt`` and it releases the GIL.

Optional (the ``fast-csv`` extra). :func:`parse_floats` is deliberately narrow: it only
accepts blocks that it parses exactly as ``np.loadtxt`` would and returns ``None`` for
anything else (a bad line, a short row, a blank-looking line, quotes, a NaN spelling
numpy and pandas read differently...). The caller then parses that block with numpy,
which also finds the exact bad line for the error message. So values are bit-exact and
errors are numpy's, whichever parser ran.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["available", "parse_floats"]

try:
    import pandas as pd
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    pd = None

# pandas 3 parses every float correctly rounded (bit-exact with numpy); older versions'
# default converter was not guaranteed to be, so they are not used.
_MIN_MAJOR = 3
# Spellings read as NaN, each the same bits as numpy's (a positive quiet NaN). Anything
# else pandas will not take as a float ("-nan", "NA", "") sends the block to numpy.
_NAN_SPELLINGS = ["nan", "NaN", "NAN"]
_warned = False


def available() -> bool:
    """Whether the fast parser can be used; warns once (in the log) how to get it if not."""
    global _warned
    usable = pd is not None and int(pd.__version__.split(".")[0]) >= _MIN_MAJOR
    if not usable and not _warned:
        _warned = True
        found = "not installed" if pd is None else f"{pd.__version__} is older than 3.0"
        log.warning(
            "pandas %s: CSV replay uses numpy's parser, about 5x slower and holding the GIL; "
            "fix: pip install 'streaminghub-datamux[fast-csv]'",
            found,
        )
    return usable


def parse_floats(
    text: bytes, usecols: list[int], rows: int, width: int | None = None
) -> list[np.ndarray] | None:
    """Columns ``usecols`` (in that order) of a CSV block, each float64 ``(rows,)``.

    ``rows`` is the number of lines in ``text``: a result with any other number of rows
    means pandas skipped a line numpy would not (a line of spaces), so it is refused.
    ``width``, given when ``usecols`` are all of the file's columns: pandas then reads
    every cell and refuses any line with another number of cells (too many: a tokenizing
    error; too few: an empty cell that is not a float), so the caller need not count
    commas. Without it, unread cells are skipped unseen.
    Returns ``None`` when pandas refuses the block or the result could differ from numpy's.
    """
    assert pd is not None
    try:
        with pd.read_csv(
            io.BytesIO(text),
            header=None,
            # usecols=None when all are read: pandas then checks every line's width.
            usecols=None if width is not None else sorted(set(usecols)),
            dtype=np.float64,
            engine="c",
            quoting=csv.QUOTE_NONE,  # numpy's reader (non-marker streams) has no quotes
            keep_default_na=False,
            na_values=_NAN_SPELLINGS,
            low_memory=False,  # one pass over the block, not pieces joined afterwards
            iterator=True,
        ) as reader:
            by_position = _read_columns(reader)
    except (ValueError, IndexError, OverflowError):
        # ParserError and EmptyDataError are ValueErrors; numpy will say what is wrong.
        return None
    if not isinstance(by_position, Mapping):
        return None
    if width is not None and len(by_position) != width:
        return None  # pandas takes the first line's width: it was not the header's
    columns: list[np.ndarray] = []
    for position in usecols:
        column = by_position.get(position)
        if not isinstance(column, np.ndarray) or column.dtype != np.float64 or len(column) != rows:
            return None
        columns.append(column)
    return columns


def _read_columns(reader: Any) -> Mapping[Any, Any]:
    """The parsed columns by position, without building a DataFrame.

    A DataFrame holds the GIL to wrap every column (a third of the whole parse at 64
    columns) and ``to_numpy`` then copies them into one 2-D array: the parser engine's own
    dict of column arrays skips both. That dict is pandas-internal
    (``TextFileReader._engine.read``, as of pandas 3.1); where it is missing, the public
    ``read()`` gives the same columns, slower.
    """
    engine = getattr(reader, "_engine", None)
    if engine is None or not hasattr(engine, "read"):
        frame = reader.read()
        return {position: frame[position].to_numpy() for position in frame.columns}
    result = engine.read()
    # Anything else than (index, names, columns) leaves the block to numpy (same values).
    return result[2] if isinstance(result, tuple) and len(result) == 3 else {}
