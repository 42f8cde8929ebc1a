"""report.html escapes every non-numeric cell (jinja2 autoescape), numbers stay formatted."""

from __future__ import annotations

import json
from pathlib import Path

from craft_ray.report.html import build_report


def test_text_cells_are_escaped_and_numbers_formatted(tmp_path: Path):
    stage = tmp_path / "generate"
    stage.mkdir()
    stage.joinpath("stats.json").write_text(json.dumps({
        "rows_in": "<b>12</b>", "rows_out": 1234567, "seconds": 1.5,
        "rejects": {"<script>alert(1)</script>": 3}}))
    page = build_report(tmp_path).read_text()
    assert "<script" not in page and "<b>12" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;12&lt;/b&gt;" in page
    assert '<td class="num">1,234,567</td>' in page and '<td class="num">1.500</td>' in page
    assert '<span class="no">incomplete</span>' in page  # no _SUCCESS marker yet
