"""The one markdown-table writer of the reports (evaluation, certified accuracy, OOD, rejection)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd


def _cell(value: Any, fmt: str, missing: str) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, bool | numbers.Integral):
        return missing if not math.isfinite(float(value)) else format(float(value), fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame, fmt: str = ".2f", missing: str = "–") -> str:
    """A GitHub markdown table of ``table`` without its index: floats written with ``fmt``
    (``format`` spec, e.g. ``.1f`` or ``.4g``), NaN and infinities as ``missing``, text escaped;
    a column whose cells all read as numbers (``81.0 ± 1.4`` and ``4/255`` included) or are
    missing is right-aligned."""
    rows = [[_cell(v, fmt, missing) for v in row] for row in table.itertuples(index=False, name=None)]
    numeric = [bool(rows) and all(_reads_as_number(r[i], missing) for r in rows) for i in range(table.shape[1])]
    lines = [
        "| " + " | ".join(_cell(c, fmt, missing) for c in table.columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def _reads_as_number(text: str, missing: str) -> bool:
    return text == missing or text.lstrip("-")[:1].isdigit()
