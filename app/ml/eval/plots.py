"""Report figures: the confusion matrix (every class, readable Chinese names) and the training loss curve.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no GUI backend, no
global state), so the worker and the API can draw from threads. Chinese label names need a CJK
font: ``mplfonts`` ships Noto Sans CJK SC inside its package, registered here with matplotlib's
font manager directly (no mplfonts CLI, no download). Without any CJK font the matrix falls back
to numeric ids with an id -> name legend.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from app.domain.labels import LabelSet

CONFUSION_DPI = 300
LOSS_DPI = 150
_BUNDLED_CJK_FONTS = ("NotoSansCJKsc-Regular.otf", "SourceHanSerifSC-Regular.otf", "SimHei.ttf")
_SYSTEM_CJK_FAMILIES = ("Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei")


@lru_cache(maxsize=1)
def cjk_font_family() -> str | None:
    """Name of a registered font family that has Chinese glyphs, or None."""
    try:
        import mplfonts

        fonts_dir = Path(mplfonts.__file__).parent / "fonts"
    except ImportError:
        fonts_dir = None
    if fonts_dir is not None:
        for name in _BUNDLED_CJK_FONTS:
            path = fonts_dir / name
            if path.is_file():
                font_manager.fontManager.addfont(str(path))
                return font_manager.FontProperties(fname=str(path)).get_name()
    available = {font.name for font in font_manager.fontManager.ttflist}
    return next((family for family in _SYSTEM_CJK_FAMILIES if family in available), None)


def _font_families() -> list[str]:
    cjk = cjk_font_family()
    return [cjk, "DejaVu Sans"] if cjk else ["DejaVu Sans"]


def build_confusion_matrix_figure(matrix: list[list[int]], label_set: LabelSet) -> Figure:
    """The confusion matrix as a Figure: one row and column per class (true rows, predicted columns)."""
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    n = len(label_set)
    if data.shape != (n, n):
        raise ValueError(f"matrix is {data.shape}, the label set has {n} classes")
    cjk = cjk_font_family()
    if cjk:
        ticks = [f"{lab.id} {lab.name}" for lab in label_set]
    else:
        ticks = [str(lab.id) for lab in label_set]

    side = max(6.0, 0.42 * n + 4.5)
    fig = Figure(figsize=(side + (0 if cjk else 4), side))
    FigureCanvasAgg(fig)
    families = _font_families()
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(data, cmap="Blues", interpolation="nearest", aspect="equal")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    ax.set_xticks(range(n), labels=ticks, rotation=90, fontsize=7, family=families)
    ax.set_yticks(range(n), labels=ticks, fontsize=7, family=families)
    ax.set_xlabel("预测意图 (predicted)" if cjk else "predicted", family=families)
    ax.set_ylabel("真实意图 (true)" if cjk else "true", family=families)
    ax.set_title("混淆矩阵 Confusion matrix" if cjk else "Confusion matrix", family=families)
    peak = data.max() if data.size else 0.0
    for i in range(n):
        for j in range(n):
            if data[i, j] > 0:
                ax.text(
                    j, i, f"{int(data[i, j])}", ha="center", va="center", fontsize=5,
                    color="white" if data[i, j] > peak / 2 else "black",
                )
    if not cjk:
        legend = "\n".join(f"{lab.id}: {lab.name}" for lab in label_set)
        fig.text(0.80, 0.5, legend, fontsize=6, va="center", family=families)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: list[list[int]], label_set: LabelSet, path: Path) -> Path:
    """Draw the confusion matrix into ``path`` (PNG, 300 DPI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    build_confusion_matrix_figure(matrix, label_set).savefig(path, dpi=CONFUSION_DPI)
    return path


def build_loss_figure(history: list[dict]) -> Figure:
    """Step vs training loss (and eval loss where the history has it)."""
    train = [(item["step"], item["loss"]) for item in history if item.get("loss") is not None and "step" in item]
    evals = [(item["step"], item["eval_loss"]) for item in history if item.get("eval_loss") is not None and "step" in item]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 50 else None, label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    if not train and not evals:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curve(history: list[dict], path: Path) -> Path:
    """Draw the loss curve of ``history`` ({"step", "loss", ...} items) into ``path`` (PNG, 150 DPI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    build_loss_figure(history).savefig(path, dpi=LOSS_DPI)
    return path
