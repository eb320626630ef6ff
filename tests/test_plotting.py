"""Plotting helpers: one trace per row, figures displayed once, labelled colour bars, small HTML files that share
one plotly.js per folder and open offline, token heatmaps that wrap and show whole characters."""
from __future__ import annotations

import re

import plotly.graph_objects as go
import plotly.offline
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from helpers.notebook import plotting
from helpers.core.paths import MODELS_DIR


def test_line_draws_one_trace_per_row_and_saves_html_that_loads_plotly_from_its_folder(tmp_path):
    fig = plotting.line(torch.randn(3, 10), labels=["a", "b", "c"], show=False, save=tmp_path / "sub" / "lines")
    assert [trace.name for trace in fig.data] == ["a", "b", "c"]
    html = (tmp_path / "sub" / "lines.html").read_text()
    sources = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", html)
    assert sources == [plotting.PLOTLY_BUNDLE]  # a local file next to the figure, nothing from a CDN
    assert len(html) < 100_000  # the bundle is not embedded
    bundle = (tmp_path / "sub" / plotting.PLOTLY_BUNDLE).read_text()
    assert bundle == plotly.offline.get_plotlyjs()  # the whole library, so the folder opens offline


def test_figures_in_one_folder_share_one_bundle_and_a_stale_bundle_is_replaced(tmp_path):
    stale = tmp_path / plotting.PLOTLY_BUNDLE
    stale.write_text("/**\n* plotly.js v0.0.1\n*/")
    plotting.bar(torch.ones(3), show=False, save=tmp_path / "one.html")
    plotting.imshow(torch.randn(3, 3), show=False, save=tmp_path / "two")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.html", plotting.PLOTLY_BUNDLE, "two.html"]
    assert f"plotly.js v{plotly.offline.get_plotlyjs_version()}" in stale.read_text()[:200]


def test_show_displays_once_and_returns_nothing_so_a_last_expression_is_not_echoed(monkeypatch):
    shown = []
    monkeypatch.setattr(go.Figure, "show", lambda fig, *args, **kwargs: shown.append(fig))
    x = torch.arange(5.0)
    calls = [lambda **kw: plotting.imshow(torch.randn(2, 2), **kw), lambda **kw: plotting.line(x, **kw),
             lambda **kw: plotting.scatter(x, x, **kw), lambda **kw: plotting.histogram(x, **kw),
             lambda **kw: plotting.bar(x, **kw)]
    for call in calls:
        assert call() is None
        assert isinstance(call(show=False), go.Figure)
    assert len(shown) == len(calls)


def test_imshow_facets_and_midpoint(tmp_path):
    fig = plotting.imshow(torch.randn(2, 4, 5), facet_col=0, title="t", show=False)
    assert len(fig.data) == 2
    assert fig.layout.coloraxis.cmid == 0.0
    named = plotting.imshow(torch.randn(3, 4, 5), facet_col=0, facet_labels=["q", "k", "v"], show=False)
    assert sorted(note.text for note in named.layout.annotations) == ["k", "q", "v"]


def test_every_colour_bar_is_labelled():
    x = torch.arange(4.0)
    heatmap = plotting.imshow(torch.randn(3, 3), show=False)
    assert heatmap.layout.coloraxis.colorbar.title.text == "value"
    named = plotting.imshow(torch.randn(3, 3), caxis="logit difference", diverging=False, show=False)
    assert named.layout.coloraxis.colorbar.title.text == "logit difference"
    assert plotting.scatter(x, x, color=x, caxis="number", show=False).layout.coloraxis.colorbar.title.text == "number"
    assert plotting.bar(x, color=x, caxis="size", show=False).layout.coloraxis.colorbar.title.text == "size"


def test_scatter_histogram_bar_accept_tensors():
    x = torch.arange(10.0)
    assert len(plotting.scatter(x, x ** 2, color=x, show=False).data) == 1
    assert len(plotting.histogram(torch.randn(100), color=["a", "b"] * 50, show=False).data) == 2
    assert len(plotting.bar(torch.ones(4), x=list("abcd"), show=False).data) == 1


def test_token_heatmap_wraps_between_tokens_and_breaks_lines_at_newlines(tmp_path):
    html = plotting.token_heatmap_html(["a", " b", "\n", "c"], [1.0, -1.0, 0.0, 0.5], save=tmp_path / "h")
    assert html.count("<wbr>") == 3 and html.count("<br>") == 1  # a break opportunity after every token
    assert "white-space: normal" in html
    assert "rgb(255,0,0)" in html and "rgb(0,0,255)" in html  # +max is red, -max is blue
    assert (tmp_path / "h.html").read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError):
        plotting.token_heatmap_html(["a"], [1.0, 2.0])


def test_whole_character_tokens_join_byte_pieces_and_sum_their_values():
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(MODELS_DIR / "toy-bilingual" / "tokenizer.json"))
    text = "Grüße aus Köln"
    ids = tokenizer(text).input_ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the planted case: umlauts split into bytes
    strings, values = plotting.whole_character_tokens(tokenizer, ids, torch.ones(len(ids)))
    assert "".join(strings) == text and not any("\ufffd" in s for s in strings)
    assert len(strings) < len(ids) and values.sum() == len(ids)  # nothing lost, pieces summed
    assert values.max() > 1


def test_a_saved_figure_reads_back_and_redraws_as_a_static_png(tmp_path):
    epochs = torch.arange(0, 500, 50)
    losses = torch.stack([torch.linspace(3, 0.01, 10), torch.linspace(3, 1, 10)])
    fig = plotting.line(losses, x=epochs, labels=["train", "test"], log_y=True, xaxis="epoch", yaxis="loss",
                        title="curve", show=False)
    fig.add_vline(x=200, annotation_text="grokked")
    plotting.save_figure(fig, tmp_path / "curve.html")
    saved = plotting.read_saved_figure(tmp_path / "curve.html")
    assert [trace["name"] for trace in saved["data"]] == ["train", "test"]
    assert torch.allclose(torch.tensor(saved["data"][1]["y"]), losses[1])  # typed arrays decoded to the values
    assert saved["layout"]["yaxis"]["type"] == "log" and saved["layout"]["shapes"][0]["x0"] == 200
    plotting.imshow(torch.randn(3, 4), caxis="logit diff", show=False, save=tmp_path / "map")
    plotting.bar(torch.tensor([1.0, 2.0]), x=["a", "b"], error_y=[0.1, 0.2], show=False, save=tmp_path / "bars")
    plotting.histogram(torch.randn(200), color=["x", "y"] * 100, histnorm="percent", show=False, save=tmp_path / "h")
    assert plotting.read_saved_figure(tmp_path / "map.html")["layout"]["coloraxis"]["colorbar"]["title"]["text"] == \
        "logit diff"
    for name in ("curve", "map", "bars", "h"):
        png = plotting.static_figure(plotting.read_saved_figure(tmp_path / f"{name}.html"), tmp_path / "png" / name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < png.stat().st_size < 200_000
    (tmp_path / "plain.html").write_text("<html><body>no figure</body></html>")
    with pytest.raises(ValueError, match="no plotly figure"):
        plotting.read_saved_figure(tmp_path / "plain.html")
