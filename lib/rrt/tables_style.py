"""How a paper table reads in a notebook: the paper's precision per column kind, empty cells as a grey "–",
Δ columns coloured only where the difference exceeds its tolerance, headers that wrap instead of being cut off.

pandas' `background_gradient` falls short twice: it colours a Δ of 3.55e-15 (float noise) as fully as the largest
gain, and it paints NaN cells black (the colormap's transparent "bad" colour written as #000000). So the
colours are computed here, per cell.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps, colors

EMPTY = "–"                      # what an empty (NaN) cell shows
EMPTY_CSS = "color: #9a9a9a;"    # grey, never a black background
RTOL = 1e-9                      # a Δ within RTOL × the magnitude of the numbers it compares is no difference
CMAP = "RdYlGn"
# Headers wrap (a long column name must not widen the table past the page), cells stay on one line.
TABLE_STYLES = [{"selector": "th", "props": "white-space: normal; max-width: 9em; vertical-align: bottom;"},
                {"selector": "td", "props": "white-space: nowrap;"},
                {"selector": "caption", "props": "caption-side: top; text-align: left; white-space: normal;"}]


def style(df: pd.DataFrame, caption: str | None = None, *, tolerance: dict | None = None, rtol: float = RTOL):
    """Return a Styler: the paper's precision per column kind, NaN as a grey "–", each Δ column coloured by sign
    (diverging red–green centred on 0, or on 1 for × ratios) where |Δ − centre| exceeds its tolerance, and `caption`.

    tolerance: {Δ column: absolute tolerance} (e.g. the Δ's stderr); otherwise rtol × the largest magnitude in
    that column and the columns it is computed from (its name without "Δ"), at least rtol."""
    styler = df.style.hide(axis="index").format(na_rep=EMPTY).set_table_styles(TABLE_STYLES)
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    styler = styler.format({c: number_format(c) for c in numeric}, na_rep=EMPTY)  # bools stay True/False
    styler = styler.map(lambda v: EMPTY_CSS if _missing(v) else "")
    for col in [c for c in df.columns if str(c).startswith(("Δ", "paper Δ"))]:
        tol = (tolerance or {}).get(col, _tolerance(df, col, rtol))
        styler = styler.apply(diverging, subset=[col], center=1.0 if "×" in col else 0.0, tol=tol)
    return styler.set_caption(caption) if caption else styler


def diverging(values: pd.Series, *, center: float = 0.0, tol: float = 0.0, cmap: str = CMAP) -> list[str]:
    """CSS per cell: red below `center`, green above, scaled by the column's largest |value − center|; cells within
    `tol` of the centre (and NaN) uncoloured, NaN in grey."""
    v = pd.to_numeric(values, errors="coerce").astype(float)
    off = v - center
    spread = np.nanmax(np.abs(off.to_numpy())) if off.notna().any() else 0.0
    out = []
    for x in off:
        if np.isnan(x):
            out.append(EMPTY_CSS)
        elif abs(x) <= tol or spread <= tol:
            out.append("")
        else:
            rgb = colormaps[cmap](0.5 + 0.5 * x / spread)[:3]
            ink = "#000000" if colors.rgb_to_hsv(rgb)[2] * (1 - 0.5 * colors.rgb_to_hsv(rgb)[1]) > 0.45 else "#ffffff"
            out.append(f"background-color: {colors.to_hex(rgb)}; color: {ink};")
    return out


def number_format(col: str) -> str:
    """The paper's precision for a column by its unit: points signed to 0.1, % to 0.1, ratios ×0.01, ..."""
    for key, fmt in (("(pts)", "{:+.1f}"), ("(%)", "{:.1f}"), ("×", "{:.2f}×"), ("ppl ", "{:.2f}"),
                     ("ms/token", "{:.3f}"), ("tokens/s", "{:.1f}"), ("(M)", "{:.1f}")):
        if key in col:
            return fmt
    return "{:.4g}"


def plain(value) -> str:
    """A number as a reader writes it (numpy scalars without their repr): 64, 0.5, 3.2e-05; NaN as "–"."""
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return "[" + ", ".join(plain(v) for v in value) + "]"
    if _missing(value):
        return EMPTY
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and float(value).is_integer()):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def _missing(value) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _tolerance(df: pd.DataFrame, col: str, rtol: float) -> float:
    """rtol × the largest magnitude among the Δ column and the value columns it compares (same unit)."""
    unit = col[col.rfind("("):] if "(" in col else ""
    sources = [c for c in df.columns if c == col or (unit and str(c).endswith(unit) and "Δ" not in str(c))
               or (unit == "(pts)" and str(c).endswith("(%)"))]
    values = pd.concat([pd.to_numeric(df[c], errors="coerce") for c in sources]).abs()
    return rtol * max(1.0, float(values.max()) if values.notna().any() else 1.0)
