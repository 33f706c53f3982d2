"""The PNG chart of ``jt808 report violations``: Chinese text in a CJK font, whole-number ticks.

The system's CJK font (Debian's fonts-noto-cjk, installed by ``.ci/run``) is needed; without it
these tests are skipped, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from alerts import RULE_NAMES
from storage import ViolationCount
from storage.reports_violations import BackfillCount
from tools import report_chart
from tools.report_chart import (
    RULE_LABELS,
    ChartFontError,
    build_figure,
    chart_style,
    draw_png,
    find_cjk_font,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COUNTS = [
    ViolationCount(unit="昆明市财政局", rule="holiday_sealing", violations=3, vehicles=2),
    ViolationCount(unit="昆明市财政局", rule="overspeed", violations=1, vehicles=1),
    ViolationCount(unit="云南省审计厅", rule="out_of_area", violations=2, vehicles=1),
    ViolationCount(unit="云南省审计厅", rule="unfiled_trip", violations=1, vehicles=1),
]
BACKFILLING = [
    BackfillCount(unit="昆明市财政局", in_time=2, late=1, claimed_earlier=1),
    BackfillCount(unit="云南省审计厅", in_time=1, late=0, claimed_earlier=0),
]


@pytest.fixture
def cjk_font() -> str:
    family = find_cjk_font()
    if family is None:
        reason = f"no CJK font: {report_chart.INSTALL_HINT}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CJK font needed in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    return family


@pytest.fixture
def font_complaints(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    """What matplotlib has said so far about fonts: warnings (a glyph missing from a font) and
    log lines (a family not found)."""
    caplog.set_level(logging.WARNING, logger="matplotlib")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield (
            lambda: (
                [str(w.message) for w in caught]
                + [r.getMessage() for r in caplog.records if r.name.startswith("matplotlib")]
            )
        )


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if isinstance(t, Text)]


def test_chinese_renders_without_missing_glyphs(
    cjk_font: str, font_complaints: Callable[[], list[str]], tmp_path: Path
) -> None:
    out = tmp_path / "report.png"
    draw_png("2026-10", COUNTS, out, BACKFILLING)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    assert not [m for m in font_complaints() if "missing from font" in m or "findfont" in m]


def test_figure_is_bilingual_with_integer_ticks(
    cjk_font: str, font_complaints: Callable[[], list[str]]
) -> None:
    with chart_style(cjk_font):
        fig = build_figure("2026-10", COUNTS, BACKFILLING)
        fig.draw_without_rendering()
        violations, backfilling = fig.axes
        texts = "\n".join(_texts(fig))
        assert "2026年10月 各单位违规情况\nViolations per unit and rule, 2026-10" in texts
        assert "节假日封存期用车 holiday_sealing" in texts
        assert "按时补报 back-filed in time" in texts
        assert violations.get_ylabel() == "违规次数\nviolations"
        assert [t.get_text() for t in violations.get_xticklabels()] == [
            "云南省审计厅",
            "昆明市财政局",
        ]
        for ax in (violations, backfilling):
            ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
            assert len(ticks) >= 2
            assert all(float(t).is_integer() for t in ticks), ticks
            assert ax.get_ylim()[0] == 0
        # the fonts the texts were set in: the CJK family first
        assert violations.title.get_fontfamily()[0] == cjk_font
    assert not [m for m in font_complaints() if "missing from font" in m]


def test_every_rule_has_a_chinese_name() -> None:
    assert set(RULE_LABELS) == set(RULE_NAMES)


def test_no_cjk_font(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(report_chart, "find_cjk_font", lambda: None)
    out = tmp_path / "report.png"
    with pytest.raises(ChartFontError, match="apt-get install fonts-noto-cjk") as err:
        draw_png("2026-10", COUNTS, out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    # ASCII units and rules: English labels only, in the default font
    ascii_counts = [ViolationCount(unit="Audit", rule="overspeed", violations=2, vehicles=1)]
    draw_png("2026-10", ascii_counts, out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    with chart_style(None):
        fig = build_figure("2026-10", ascii_counts, chinese=False)
    assert all(text.isascii() for text in _texts(fig))
    assert "Violations per unit and rule, 2026-10" in _texts(fig)


def test_empty_period(cjk_font: str, tmp_path: Path) -> None:
    with chart_style(cjk_font):
        fig = build_figure("2026-10", [])
    assert "无违规 no violations" in _texts(fig)
    assert len(fig.axes) == 1
    draw_png("2026-10", [], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC
