"""Plots for the notebooks: imshow, line, scatter and histogram on plotly express, one style, one way to save.

One convention, so a figure is displayed exactly once:
- `show=True` (the default): the function displays the figure and returns None, so a plotting call as a cell's last
  expression does not echo it a second time;
- `show=False`: nothing is displayed and the figure is returned, for the caller to adjust (`fig.add_vline(...)`),
  save (`save_figure`) and show (`fig.show()`).
`save=path` writes an HTML file that loads `plotly.min.js` from its own folder: the folder holds one copy of the
bundle shared by all its figures (written on first save), so the files stay small and still open offline. A `.png`
suffix writes a static image instead (needs kaleido). Every colour scale carries a labelled colour bar (`caxis`).

For a page that cannot run JavaScript (the README), `read_saved_figure` reads a figure back from its saved HTML and
`static_figure` redraws it with seaborn as a small PNG: lines, markers, bars (with error bars), histograms and
heatmaps, with the saved titles, axis labels, log axes and vertical markers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.offline
import torch

PNG_DPI = 110
TEMPLATE = "plotly_white"
DIVERGING = "RdBu"
PLOTLY_BUNDLE = "plotly.min.js"


def to_numpy(value: Any) -> np.ndarray:
    """Tensors (any device, any dtype), lists and arrays to a numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype).numpy()
    return np.asarray(value)


def _write_bundle(folder: Path) -> None:
    """Put this plotly's `plotly.min.js` in `folder`, replacing a copy written by another plotly version."""
    bundle = folder / PLOTLY_BUNDLE
    version = f"plotly.js v{plotly.offline.get_plotlyjs_version()}"
    if bundle.exists():
        with bundle.open(encoding="utf-8") as handle:
            if version in handle.read(200):
                return
    bundle.write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")


def save_figure(fig: go.Figure, path: str | Path) -> Path:
    """Write `fig` as HTML (`.html`, the default when there is no suffix) or PNG (`.png`). The HTML file references
    `plotly.min.js` in its own folder, which is written there once, so the folder opens offline as a whole."""
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        fig.write_image(path)
    else:
        _write_bundle(path.parent)
        fig.write_html(path, include_plotlyjs="directory", full_html=True)
    return path


def _finish(fig: go.Figure, title: str | None, save: str | Path | None, show: bool) -> go.Figure | None:
    fig.update_layout(template=TEMPLATE, title=title, title_x=0.5, margin=dict(t=60 if title else 30))
    if save is not None:
        save_figure(fig, save)
    if not show:
        return fig
    fig.show()
    return None


def imshow(tensor: Any, *, x: Sequence | None = None, y: Sequence | None = None, xaxis: str = "", yaxis: str = "",
           caxis: str = "value", title: str | None = None, diverging: bool = True, save: str | Path | None = None,
           show: bool = True, facet_labels: Sequence[str] | None = None, **kwargs: Any) -> go.Figure | None:
    """Heatmap of a 2-D array (or 3-D with `facet_col=0`, each facet titled by `facet_labels` instead of
    "facet_col=i"), its colour bar titled `caxis`. Diverging RdBu centred on 0 unless `diverging=False`."""
    colors = dict(color_continuous_midpoint=0.0, color_continuous_scale=DIVERGING) if diverging else {}
    fig = px.imshow(to_numpy(tensor), x=x, y=y, labels={"x": xaxis, "y": yaxis, "color": caxis}, aspect="auto",
                    **colors, **kwargs)
    if facet_labels is not None:
        fig.for_each_annotation(lambda note: note.update(text=facet_labels[int(note.text.split("=")[-1])]))
    return _finish(fig, title, save, show)


def line(y: Any, *, x: Any = None, labels: Sequence[str] | None = None, xaxis: str = "", yaxis: str = "",
         log_y: bool = False, log_x: bool = False, title: str | None = None, save: str | Path | None = None,
         show: bool = True, **kwargs: Any) -> go.Figure | None:
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
            caxis: str = "value", title: str | None = None, save: str | Path | None = None, show: bool = True,
            **kwargs: Any) -> go.Figure | None:
    """Scatter of `y` against `x`, optionally coloured (colour bar titled `caxis`) and with hover text."""
    fig = px.scatter(x=to_numpy(x), y=to_numpy(y), color=None if color is None else to_numpy(color),
                     hover_name=None if hover is None else list(hover),
                     labels={"x": xaxis, "y": yaxis, "color": caxis}, **kwargs)
    return _finish(fig, title, save, show)


def histogram(values: Any, *, color: Any = None, nbins: int | None = None, xaxis: str = "", title: str | None = None,
              save: str | Path | None = None, show: bool = True, **kwargs: Any) -> go.Figure | None:
    """Histogram of `values`; `color` splits it into overlaid groups."""
    frame = pd.DataFrame({"value": to_numpy(values).reshape(-1)})
    if color is not None:
        frame["group"] = list(np.asarray(color).reshape(-1))
    fig = px.histogram(frame, x="value", color="group" if color is not None else None, nbins=nbins,
                       barmode="overlay", labels={"value": xaxis, "group": ""}, **kwargs)
    return _finish(fig, title, save, show)


def bar(values: Any, *, x: Sequence | None = None, color: Any = None, xaxis: str = "", yaxis: str = "",
        caxis: str = "", title: str | None = None, save: str | Path | None = None, show: bool = True,
        **kwargs: Any) -> go.Figure | None:
    """Bar chart of a 1-D array against `x` labels; `color` (labels or numbers, the legend or colour bar titled
    `caxis`) colours the bars."""
    heights = to_numpy(values)
    fig = px.bar(x=list(x) if x is not None else np.arange(len(heights)), y=heights,
                 color=None if color is None else to_numpy(color), labels={"x": xaxis, "y": yaxis, "color": caxis},
                 **kwargs)
    return _finish(fig, title, save, show)


def whole_character_tokens(tokenizer: Any, ids: Sequence[int], values: Any) -> tuple[list[str], np.ndarray]:
    """Display strings for `ids` with byte-level pieces of one character joined, and their `values` summed.

    A byte-level BPE tokenizer splits "ü" into two tokens, each of which decodes alone to "\ufffd". Consecutive
    tokens are joined until their joint decoding has no replacement character (at most 4, the longest UTF-8
    character), and the group's value is the sum of its tokens' values (for per-token loss changes: the loss
    change of the whole character). Returns `(strings, values)` for `token_heatmap_html`."""
    vals = to_numpy(values).astype(float).reshape(-1)
    if len(vals) != len(ids):
        raise ValueError(f"{len(ids)} token ids but {len(vals)} values")
    strings, merged, start = [], [], 0
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode([int(i) for i in ids[start:end]])
        if "\ufffd" in text and end - start < 4 and end < len(ids):
            continue
        strings.append(text)
        merged.append(vals[start:end].sum())
        start = end
    return strings, np.asarray(merged)


def token_heatmap_html(tokens: Sequence[str], values: Any, *, max_value: float | None = None,
                       tooltips: Sequence[str] | None = None, title: str | None = None,
                       save: str | Path | None = None) -> str:
    """Tokens as coloured HTML spans: red for positive values, blue for negative, white at 0 (the original notebook's
    `print_strings_as_html`). Values are scaled by `max_value` (default: the largest |value|) and clipped to
    [-1, 1]; the text turns white on dark cells. `tooltips[i]` is shown on hover. The text wraps between tokens
    (and after a newline token, shown as `\\n`), so a long document stays inside the page. Returns the HTML string
    (display it with `IPython.display.HTML`); `save=path` also writes a standalone `.html` file."""
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
        breaks = "<br>" if "\n" in token else "<wbr>"
        spans.append(f'<span style="background-color: rgb({r},{g},{b}); color: {text_colour}; '
                     f'border: 1px solid #eee; font-family: monospace;" title="{tip}">{shown}</span>{breaks}')
    head = f"<div><b>{html_lib.escape(title)}</b></div>" if title else ""
    out = (f'<div style="line-height: 1.9; white-space: normal; overflow-wrap: anywhere; max-width: 100%;">'
           f'{head}{"".join(spans)}</div>')
    if save is not None:
        path = Path(save)
        path = path if path.suffix else path.with_suffix(".html")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<!DOCTYPE html><html><meta charset='utf-8'><body>{out}</body></html>\n", encoding="utf-8")
    return out


def _decode_arrays(value: Any) -> Any:
    """Plotly's saved JSON with its typed arrays (`{"dtype": "f8", "bdata": base64, "shape": "2, 3"}`) as numpy."""
    import base64

    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return array.reshape([int(n) for n in str(shape).split(",")]) if shape else array
    if isinstance(value, dict):
        return {key: _decode_arrays(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_arrays(item) for item in value]
    return value


def read_saved_figure(path: str | Path) -> dict:
    """The `{"data": [traces], "layout": {...}}` of a figure saved by `save_figure` (or any plotly HTML file),
    typed arrays decoded to numpy; read from the `Plotly.newPlot(...)` call, so no browser is needed."""
    import json

    text = Path(path).read_text(encoding="utf-8")
    call = text.find("Plotly.newPlot(")
    if call < 0:
        raise ValueError(f"{path} holds no plotly figure")
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(text, text.index("[", call))
    layout, _ = decoder.raw_decode(text, text.index("{", end))
    return {"data": _decode_arrays(data), "layout": _decode_arrays(layout)}


def _title(part: dict | None) -> str:
    title = (part or {}).get("title") or {}
    return title.get("text") or "" if isinstance(title, dict) else str(title)


def static_figure(figure: dict | go.Figure, path: str | Path, *, width: float = 6.4, height: float = 3.6) -> Path:
    """Redraw a plotly figure (a `go.Figure` or `read_saved_figure`'s dict) with seaborn and save it as a PNG: one
    line/marker/bar/histogram per trace (named in the legend) or the first heatmap with its labelled colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    spec = figure.to_plotly_json() if isinstance(figure, go.Figure) else figure
    traces, layout = [_decode_arrays(trace) for trace in spec["data"]], _decode_arrays(spec.get("layout", {}))
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(width, height), dpi=PNG_DPI)
    named = False
    heatmaps = [trace for trace in traces if trace.get("type") == "heatmap"]
    if heatmaps:
        trace, colors = heatmaps[0], layout.get("coloraxis", {})
        z = np.asarray(trace["z"], dtype=float)
        diverging = colors.get("cmid") == 0
        limit = float(np.nanmax(np.abs(z))) if diverging else None
        sns.heatmap(z, ax=ax, cmap="RdBu_r" if diverging else "viridis", center=0 if diverging else None,
                    vmin=-limit if diverging else None, vmax=limit if diverging else None,
                    xticklabels=list(trace.get("x", [])) or "auto", yticklabels=list(trace.get("y", [])) or "auto",
                    cbar_kws={"label": _title(colors.get("colorbar"))})
    for trace in traces:
        kind, name = trace.get("type", "scatter"), trace.get("name") or None
        named |= name is not None and len(traces) > 1
        if kind == "scatter":
            x = np.asarray(trace.get("x", np.arange(len(trace["y"]))))
            y = np.asarray(trace["y"], dtype=float)
            if "lines" in (trace.get("mode") or "lines"):
                sns.lineplot(x=x, y=y, ax=ax, label=name, errorbar=None)
            else:
                sns.scatterplot(x=x, y=y, ax=ax, label=name, s=14)
        elif kind == "bar":
            x, y = [str(v) for v in trace["x"]], np.asarray(trace["y"], dtype=float)
            sns.barplot(x=x, y=y, ax=ax, color=sns.color_palette()[0], label=name)
            errors = (trace.get("error_y") or {}).get("array")
            if errors is not None:
                ax.errorbar(np.arange(len(x)), y, yerr=np.asarray(errors, dtype=float), fmt="none", ecolor="black",
                            capsize=3)
            ax.tick_params(axis="x", labelrotation=20 if max(map(len, x)) > 8 else 0)
        elif kind == "histogram":
            stats = {"percent": "percent", "probability": "probability", "density": "density",
                     "probability density": "density"}
            sns.histplot(np.asarray(trace["x"], dtype=float), ax=ax, label=name, bins=trace.get("nbinsx") or 40,
                         alpha=0.5, stat=stats.get(trace.get("histnorm") or "", "count"), element="step")
    for shape in layout.get("shapes", []):
        if shape.get("x0") == shape.get("x1") and shape.get("x0") is not None:
            ax.axvline(float(shape["x0"]), color="grey", linestyle="--", linewidth=1)
    for note in layout.get("annotations", []):
        if note.get("x") is not None and note.get("text"):
            ax.annotate(note["text"], (float(note["x"]), 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                        rotation=90, va="top", ha="right", color="grey")
    for axis, set_scale in (("xaxis", ax.set_xscale), ("yaxis", ax.set_yscale)):
        if layout.get(axis, {}).get("type") == "log":
            set_scale("log")
    ax.set_xlabel(_title(layout.get("xaxis")))
    ax.set_ylabel(_title(layout.get("yaxis")))
    ax.set_title(_title(layout), fontsize=11)
    if named:
        ax.legend(fontsize=8)
    elif ax.get_legend() is not None:
        ax.get_legend().remove()
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


EDGE_WIDTHS = 8  # line widths a circuit graph draws its edges in: one trace per width and sign


def circuit_graph(labels: Sequence[str], positions: Sequence[tuple[float, float]],
                  edges: Sequence[tuple[int, int, float]], *, title: str | None = None, xaxis: str = "head",
                  yaxis: str = "layer", save: str | Path | None = None, show: bool = True) -> go.Figure | None:
    """A circuit as a layered graph: nodes at `positions` (x, y) named by `labels`, one line per edge `(from, to,
    score)` with width proportional to |score| (in `EDGE_WIDTHS` steps) and colour by sign (blue raises the metric
    when kept, red lowers it); hovering an edge's end names it. `helpers.techniques.eap.circuit_drawing` gives the three
    arguments for an edge circuit. The lines of one width and sign are one trace, so a circuit of 27,000 edges draws
    in a second (a trace per edge took a minute)."""
    fig = go.Figure()
    largest = max((abs(score) for _, _, score in edges), default=1.0) or 1.0
    lines: dict[tuple[int, bool], tuple[list, list, list]] = {}
    for start, end, score in edges:
        xs, ys, texts = lines.setdefault((round(EDGE_WIDTHS * abs(score) / largest), score >= 0), ([], [], []))
        (x0, y0), (x1, y1) = positions[start], positions[end]
        text = f"{labels[start]} -> {labels[end]}: {score:+.3g}"
        xs += [x0, x1, None]
        ys += [y0, y1, None]
        texts += [text, text, None]
    for (width, positive), (xs, ys, texts) in sorted(lines.items()):       # the widest drawn last, on top
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="text", text=texts, showlegend=False,
                                 line=dict(width=0.5 + 6 * width / EDGE_WIDTHS,
                                           color="#2166ac" if positive else "#b2182b")))
    xs, ys = zip(*positions) if positions else ((), ())
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=list(labels), textposition="top center",
                             marker=dict(size=12, color="#444"), hoverinfo="text", showlegend=False))
    fig.update_layout(xaxis_title=xaxis, yaxis_title=yaxis, height=120 + 70 * (max(ys, default=0) - min(ys, default=0)))
    return _finish(fig, title, save, show)
