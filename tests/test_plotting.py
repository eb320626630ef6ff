"""Plotting helpers: one trace per row, self-contained HTML that opens offline."""
from __future__ import annotations

import re

import torch

from helpers import plotting


def test_line_draws_one_trace_per_row_and_saves_standalone_html(tmp_path):
    fig = plotting.line(torch.randn(3, 10), labels=["a", "b", "c"], show=False, save=tmp_path / "sub" / "lines")
    assert [trace.name for trace in fig.data] == ["a", "b", "c"]
    html = (tmp_path / "sub" / "lines.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html)  # nothing is fetched from a CDN
    assert len(html) > 1_000_000  # plotly.js is embedded, so the file works offline


def test_imshow_facets_and_midpoint(tmp_path):
    fig = plotting.imshow(torch.randn(2, 4, 5), facet_col=0, title="t", show=False)
    assert len(fig.data) == 2
    assert fig.layout.coloraxis.cmid == 0.0


def test_scatter_histogram_bar_accept_tensors():
    x = torch.arange(10.0)
    assert len(plotting.scatter(x, x ** 2, color=x, show=False).data) == 1
    assert len(plotting.histogram(torch.randn(100), color=["a", "b"] * 50, show=False).data) == 2
    assert len(plotting.bar(torch.ones(4), x=list("abcd"), show=False).data) == 1
