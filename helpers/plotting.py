"""Plots for the notebooks: imshow, line, scatter and histogram on plotly express, one style, one way to save.

Every function returns the figure, shows it unless `show=False`, and with `save=path` writes a self-contained HTML
file (plotly.js embedded, so it opens offline) and, for a `.png` suffix, a static image if kaleido is installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

TEMPLATE = "plotly_white"
DIVERGING = "RdBu"


def to_numpy(value: Any) -> np.ndarray:
    """Tensors (any device, any dtype), lists and arrays to a numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype).numpy()
    return np.asarray(value)


def save_figure(fig: go.Figure, path: str | Path) -> Path:
    """Write `fig` as standalone HTML (`.html`, the default when there is no suffix) or PNG (`.png`)."""
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        fig.write_image(path)
    else:
        fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def _finish(fig: go.Figure, title: str | None, save: str | Path | None, show: bool) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=title, title_x=0.5, margin=dict(t=60 if title else 30))
    if save is not None:
        save_figure(fig, save)
    if show:
        fig.show()
    return fig


def imshow(tensor: Any, *, x: Sequence | None = None, y: Sequence | None = None, xaxis: str = "", yaxis: str = "",
           title: str | None = None, diverging: bool = True, save: str | Path | None = None, show: bool = True,
           **kwargs: Any) -> go.Figure:
    """Heatmap of a 2-D array (or 3-D with `facet_col=0`). Diverging RdBu centred on 0 unless `diverging=False`."""
    colors = dict(color_continuous_midpoint=0.0, color_continuous_scale=DIVERGING) if diverging else {}
    fig = px.imshow(to_numpy(tensor), x=x, y=y, labels={"x": xaxis, "y": yaxis}, aspect="auto", **colors, **kwargs)
    return _finish(fig, title, save, show)


def line(y: Any, *, x: Any = None, labels: Sequence[str] | None = None, xaxis: str = "", yaxis: str = "",
         log_y: bool = False, log_x: bool = False, title: str | None = None, save: str | Path | None = None,
         show: bool = True, **kwargs: Any) -> go.Figure:
    """One line per row of a 2-D `y` (or one line for 1-D), named by `labels`, against `x` (default 0..n-1)."""
    values = to_numpy(y) if not isinstance(y, (list, tuple)) else np.stack([to_numpy(row) for row in y])
    rows = np.atleast_2d(values)
    xs = np.arange(rows.shape[1]) if x is None else to_numpy(x)
    names = list(labels) if labels is not None else [str(i) for i in range(len(rows))]
    frame = pd.DataFrame({"x": np.tile(xs, len(rows)), "y": rows.reshape(-1),
                          "line": np.repeat(names, rows.shape[1])})
    fig = px.line(frame, x="x", y="y", color="line" if len(rows) > 1 else None, log_y=log_y, log_x=log_x,
                  labels={"x": xaxis, "y": yaxis, "line": ""}, **kwargs)
    return _finish(fig, title, save, show)


def scatter(x: Any, y: Any, *, color: Any = None, hover: Sequence | None = None, xaxis: str = "", yaxis: str = "",
            caxis: str = "", title: str | None = None, save: str | Path | None = None, show: bool = True,
            **kwargs: Any) -> go.Figure:
    """Scatter of `y` against `x`, optionally coloured and with hover text."""
    fig = px.scatter(x=to_numpy(x), y=to_numpy(y), color=None if color is None else to_numpy(color),
                     hover_name=None if hover is None else list(hover),
                     labels={"x": xaxis, "y": yaxis, "color": caxis}, **kwargs)
    return _finish(fig, title, save, show)


def histogram(values: Any, *, color: Any = None, nbins: int | None = None, xaxis: str = "", title: str | None = None,
              save: str | Path | None = None, show: bool = True, **kwargs: Any) -> go.Figure:
    """Histogram of `values`; `color` splits it into overlaid groups."""
    frame = pd.DataFrame({"value": to_numpy(values).reshape(-1)})
    if color is not None:
        frame["group"] = list(np.asarray(color).reshape(-1))
    fig = px.histogram(frame, x="value", color="group" if color is not None else None, nbins=nbins,
                       barmode="overlay", labels={"value": xaxis, "group": ""}, **kwargs)
    return _finish(fig, title, save, show)


def bar(values: Any, *, x: Sequence | None = None, color: Any = None, xaxis: str = "", yaxis: str = "",
        title: str | None = None, save: str | Path | None = None, show: bool = True, **kwargs: Any) -> go.Figure:
    """Bar chart of a 1-D array against `x` labels."""
    heights = to_numpy(values)
    fig = px.bar(x=list(x) if x is not None else np.arange(len(heights)), y=heights,
                 color=None if color is None else list(color), labels={"x": xaxis, "y": yaxis}, **kwargs)
    return _finish(fig, title, save, show)


def token_heatmap_html(tokens: Sequence[str], values: Any, *, max_value: float | None = None,
                       tooltips: Sequence[str] | None = None, title: str | None = None,
                       save: str | Path | None = None) -> str:
    """Tokens as coloured HTML spans: red for positive values, blue for negative, white at 0 (the seed's
    `print_strings_as_html`). Values are scaled by `max_value` (default: the largest |value|) and clipped to
    [-1, 1]; the text turns white on dark cells. `tooltips[i]` is shown on hover. Returns the HTML string (display
    it with `IPython.display.HTML`); `save=path` also writes a standalone `.html` file."""
    import html as html_lib

    vals = to_numpy(values).astype(float).reshape(-1)
    if len(vals) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(vals)} values")
    scale = max_value if max_value is not None else float(np.abs(vals).max()) if len(vals) else 1.0
    scale = scale if scale > 0 else 1.0
    spans = []
    for i, (token, value) in enumerate(zip(tokens, vals)):
        v = float(np.clip(value / scale, -1, 1))
        if v >= 0:
            r, g, b = 255, int((1 - v) * 255), int((1 - v) * 255)
        else:
            r, g, b = int((1 + v) * 255), int((1 + v) * 255), 255
        text_colour = "white" if (0.299 * r + 0.587 * g + 0.114 * b) / 255 < 0.5 else "black"
        tip = html_lib.escape(tooltips[i] if tooltips is not None else f"{value:.3f}", quote=True)
        shown = html_lib.escape(token).replace(" ", "&nbsp;").replace("\n", "\\n")
        spans.append(f'<span style="background-color: rgb({r},{g},{b}); color: {text_colour}; '
                     f'border: 1px solid #eee; font-family: monospace;" title="{tip}">{shown}</span>')
    head = f"<div><b>{html_lib.escape(title)}</b></div>" if title else ""
    out = f'<div style="line-height: 1.9;">{head}{"".join(spans)}</div>'
    if save is not None:
        path = Path(save)
        path = path if path.suffix else path.with_suffix(".html")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<!DOCTYPE html><html><meta charset='utf-8'><body>{out}</body></html>\n", encoding="utf-8")
    return out
