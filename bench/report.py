"""Section results and how they become markdown (tables) and PNG plots.

Every section returns a ``SectionResult``; ``bench.run`` renders them in order. A section that could
not measure something says so in ``skipped`` ("not measured: <why>") instead of inventing figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    headers: list[str]
    rows: list[list[object]]
    caption: str | None = None

    def markdown(self) -> str:
        lines = []
        if self.caption:
            lines += [self.caption, ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(format_cell(c) for c in row) + " |")
        return "\n".join(lines)


def format_cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


@dataclass
class SectionResult:
    key: str  # tokens | train | classify | accuracy
    title: str
    intro: list[str] = field(default_factory=list)  # method notes (markdown paragraphs / bullets)
    tables: list[Table] = field(default_factory=list)
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)  # after the tables: caveats, what the figures mean
    skipped: list[str] = field(default_factory=list)  # "not measured: <why>"
    seconds: float = 0.0
    data: dict = field(default_factory=dict)  # raw figures (written to JSON beside the report)

    def markdown(self, report_dir: Path) -> str:
        parts = [f"## {self.title}", ""]
        for paragraph in self.intro:
            parts += [paragraph, ""]
        for table in self.tables:
            parts += [table.markdown(), ""]
        if self.plot is not None and self.plot.is_file():
            parts += [f"![{self.title}]({relative_path(self.plot, report_dir)})", ""]
        for note in self.notes:
            parts += [note, ""]
        for reason in self.skipped:
            parts += [f"**{reason}**", ""]
        parts.append(f"_Section wall time: {self.seconds:.0f} s._")
        return "\n".join(parts)


def relative_path(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve()).replace(os.sep, "/")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def new_figure(n_panels: int, width_per_panel: float = 4.2, height: float = 3.2):
    """A small figure (PNGs stay well under 300 KB at 100 dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(width_per_panel * n_panels, height), squeeze=False)
    return fig, list(axes[0])


def bar_group(ax, groups: list[str], series: dict[str, list[float | None]], *, ylabel: str, title: str,
              value_format: str = "{:.3g}") -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series; None bars are left out."""
    n = max(1, len(series))
    width = 0.8 / n
    for index, (name, values) in enumerate(series.items()):
        xs = [g + (index - (n - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        for bar, value in zip(bars, values):
            if value is not None:
                ax.annotate(value_format.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
