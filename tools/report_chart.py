"""The violation report as a PNG chart, in Chinese with English beside it.

The readers are Chinese offices, so titles, axis labels, rule names and unit names are set in a
CJK font. None ships with matplotlib (DejaVu Sans has no Chinese glyphs: each character would be
an empty box), so :func:`find_cjk_font` looks for one installed on the system, by family name in
matplotlib's font list, then among the system's font files, since matplotlib's cached list may
predate the font's installation. On Debian and Ubuntu ``apt-get install fonts-noto-cjk``
provides Noto Sans CJK SC (SIL Open Font License 1.1). Without a CJK font a chart whose units
and rules are all ASCII is drawn with English labels only; any other raises
:class:`ChartFontError` naming the package to install.

:func:`build_figure` draws on a :class:`~matplotlib.figure.Figure` of its own (no pyplot, no
global backend), so it can be inspected before :func:`draw_png` saves it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib as mpl
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "CJK_FONT_FAMILIES",
    "INSTALL_HINT",
    "RULE_LABELS",
    "ChartFontError",
    "build_figure",
    "chart_font",
    "chart_style",
    "draw_png",
    "find_cjk_font",
]

# Families with the Simplified Chinese glyphs, best first. "Noto Sans CJK JP" is the name older
# matplotlib gives the Noto collection (it reads only the first face of a .ttc); its glyphs are
# the same apart from a few regional shapes.
CJK_FONT_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "Noto Sans CJK JP",
)
# File names of those families as Debian, Fedora and Adobe ship them.
_CJK_FILE = re.compile(r"cjk|notosanssc|sourcehansans|wqy|droidsansfallback", re.IGNORECASE)
INSTALL_HINT = "install Debian's fonts-noto-cjk (apt-get install fonts-noto-cjk)"

# Chinese names of the rules (alerts/rules.py), as the regulations call the violations.
RULE_LABELS = {
    "unfiled_trip": "未报备出车",
    "holiday_sealing": "节假日封存期用车",
    "out_of_area": "超出允许区域",
    "forbidden_zone": "进入禁入区域",
    "overnight_parking": "违规过夜停放",
    "overdue_return": "逾期未归",
    "overspeed": "超速",
    "terminal_tamper": "终端遭破坏",
    "terminal_offline": "终端离线",
}
# Back-filing figures (article 21), in the order of the report's table.
_BACKFILL_LABELS = (
    ("按时补报", "back-filed in time"),
    ("逾期补报", "back-filed late"),
    ("申报时间早于接收", "claimed earlier than receipt"),
)
_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")


class ChartFontError(Exception):
    """No font for the chart's Chinese text; the message says what to install."""


class Violations(Protocol):
    """One unit's violations of one rule (``storage.ViolationCount``)."""

    @property
    def unit(self) -> str: ...
    @property
    def rule(self) -> str: ...
    @property
    def violations(self) -> int: ...


class Backfilling(Protocol):
    """One unit's back-filing figures (``storage.reports_violations.BackfillCount``)."""

    @property
    def unit(self) -> str: ...
    @property
    def in_time(self) -> int: ...
    @property
    def late(self) -> int: ...
    @property
    def claimed_earlier(self) -> int: ...


def _known_family() -> str | None:
    names = {entry.name for entry in font_manager.fontManager.ttflist}
    return next((family for family in CJK_FONT_FAMILIES if family in names), None)


def find_cjk_font() -> str | None:
    """The family name of an installed CJK font matplotlib can use, or ``None``."""
    family = _known_family()
    if family is not None:
        return family
    # matplotlib's font list is cached on first use; a font installed since is not in it.
    for path in font_manager.findSystemFonts():
        if _CJK_FILE.search(Path(path).name):
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                font_manager.fontManager.addfont(path)
    return _known_family()


def chart_font(labels: Sequence[str]) -> str | None:
    """The CJK family to draw with, or ``None`` (English labels only) when there is none and
    every label is ASCII. Raises :class:`ChartFontError` when the labels need one."""
    family = find_cjk_font()
    if family is None and not all(label.isascii() for label in labels):
        raise ChartFontError(f"no CJK font for the chart's Chinese text: {INSTALL_HINT}")
    return family


@contextlib.contextmanager
def chart_style(family: str | None) -> Iterator[None]:
    """Draw (and save) inside this: the CJK family first, DejaVu Sans for anything it lacks."""
    families = [family, "DejaVu Sans"] if family else ["DejaVu Sans"]
    with mpl.rc_context({"font.family": families, "axes.unicode_minus": False}):
        yield


def _period_zh(period: str) -> str:
    match = _PERIOD.match(period)
    return f"{match.group(1)}年{int(match.group(2))}月" if match else period


def build_figure(
    period: str,
    counts: Sequence[Violations],
    backfilling: Sequence[Backfilling] = (),
    *,
    chinese: bool = True,
) -> Figure:
    """Grouped bars of violations (one group per unit, one bar per rule) and, when there are
    back-filings, a second chart of them per unit. ``chinese=False`` gives English labels only
    (for a system without a CJK font, and ASCII data). Build it inside :func:`chart_style`."""

    def label(zh: str, en: str, sep: str = " ") -> str:
        return f"{zh}{sep}{en}" if chinese else en

    units = sorted({c.unit for c in counts})
    rules = sorted({c.rule for c in counts})
    value = {(c.unit, c.rule): c.violations for c in counts}
    rows = 2 if backfilling else 1
    fig = Figure(figsize=(max(7.0, 1.3 * len(units) + 4), 4.8 * rows), dpi=100)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]

    ax = axes[0]
    _grouped_bars(
        ax,
        units,
        [
            (label(RULE_LABELS.get(rule, rule), rule), [value.get((u, rule), 0) for u in units])
            for rule in rules
        ],
    )
    ax.set_title(
        label(
            f"{_period_zh(period)} 各单位违规情况", f"Violations per unit and rule, {period}", "\n"
        )
    )
    ax.set_ylabel(label("违规次数", "violations", "\n"))
    ax.set_xlabel(label("单位", "unit"))
    if not rules:
        ax.text(
            0.5,
            0.5,
            label("无违规", "no violations"),
            ha="center",
            va="center",
            transform=ax.transAxes,
        )

    if backfilling:
        ax = axes[1]
        ordered = sorted(backfilling, key=lambda b: b.unit)
        b_units = [b.unit for b in ordered]
        figures = [[b.in_time for b in ordered], [b.late for b in ordered]]
        figures.append([b.claimed_earlier for b in ordered])
        _grouped_bars(
            ax,
            b_units,
            [(label(zh, en), ys) for (zh, en), ys in zip(_BACKFILL_LABELS, figures, strict=True)],
        )
        ax.set_title(
            label(f"{_period_zh(period)} 补报情况（第二十一条）", "Back-filing (article 21)", "\n")
        )
        ax.set_ylabel(label("次数", "episodes", "\n"))
        ax.set_xlabel(label("单位", "unit"))
    fig.tight_layout()
    return fig


def _grouped_bars(ax: Axes, groups: Sequence[str], series: Sequence[tuple[str, list[int]]]) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series):
        xs = [g + i * width - 0.4 + width / 2 for g in range(len(groups))]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[str(y) if y else "" for y in ys], padding=2, fontsize="small")
    ax.set_xticks(range(len(groups)), groups)
    if len(groups) > 6 or any(len(g) > 10 for g in groups):
        ax.tick_params(axis="x", labelrotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    # Counts: ticks on whole numbers only (never 0.5 violations).
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    if series:
        ax.legend(fontsize="small")


def draw_png(
    period: str,
    counts: Sequence[Violations],
    path: Path,
    backfilling: Sequence[Backfilling] = (),
) -> None:
    """The chart of :func:`build_figure` as a PNG at ``path``. Raises :class:`ChartFontError`
    (before writing anything) when the data need a CJK font and there is none, and
    :class:`OSError` when the file cannot be written."""
    labels = [c.unit for c in counts] + [c.rule for c in counts] + [b.unit for b in backfilling]
    family = chart_font(labels)
    with chart_style(family):
        fig = build_figure(period, counts, backfilling, chinese=family is not None)
        fig.savefig(path, format="png")
