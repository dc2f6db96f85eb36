"""Report figures: the confusion matrix (every class, readable Chinese names), the reliability diagram and the
training loss curve (with the validation figures of evaluations during training).

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


def build_loss_figure(history: list[dict], validation: list[dict] | None = None) -> Figure:
    """Step vs training loss (and eval loss where the history has it); with ``validation`` ({"step",
    "accuracy", "macro_f1"} items, the evaluations during training) their accuracy and macro-F1 on a
    second axis (0-1), the best macro-F1 marked."""
    train = [(item["step"], item["loss"]) for item in history if item.get("loss") is not None and "step" in item]
    evals = [(item["step"], item["eval_loss"]) for item in history if item.get("eval_loss") is not None and "step" in item]
    validation = [v for v in (validation or []) if "step" in v and v.get("macro_f1") is not None]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 50 else None, label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    if not train and not evals and not validation:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss" + (" and validation" if validation else ""))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if validation:
        right = ax.twinx()
        steps = [v["step"] for v in validation]
        right.plot(steps, [v["accuracy"] for v in validation], marker="s", color="tab:green", label="val accuracy")
        right.plot(steps, [v["macro_f1"] for v in validation], marker="^", color="tab:red", label="val macro-F1")
        best = max(validation, key=lambda v: (v["macro_f1"], -v["step"]))
        right.scatter([best["step"]], [best["macro_f1"]], s=160, facecolors="none", edgecolors="black", zorder=5,
                      label=f"best (step {best['step']})")
        right.set_ylim(0, 1.02)
        right.set_ylabel("validation accuracy / macro-F1")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    return fig


def plot_loss_curve(history: list[dict], path: Path, validation: list[dict] | None = None) -> Path:
    """Draw the loss curve of ``history`` ({"step", "loss", ...} items), and the validation figures when
    given, into ``path`` (PNG, 150 DPI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    build_loss_figure(history, validation).savefig(path, dpi=LOSS_DPI)
    return path


def build_reliability_figure(calibration: dict) -> Figure:
    """Reliability diagram of a report's ``calibration`` (``app.ml.eval.metrics.calibration``): per
    confidence bin, the accuracy against the mean confidence, the diagonal being perfect calibration,
    and how many predictions each bin holds."""
    bins = calibration["bins"]
    fig = Figure(figsize=(6, 7))
    FigureCanvasAgg(fig)
    top = fig.add_axes((0.12, 0.34, 0.82, 0.58))
    bottom = fig.add_axes((0.12, 0.08, 0.82, 0.18), sharex=top)
    width = 1.0 / len(bins) if bins else 0.1
    filled = [b for b in bins if b["count"]]
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfectly calibrated")
    top.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
            edgecolor="black", alpha=0.7, label="accuracy")
    top.bar([b["lower"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled], width=width,
            bottom=[b["accuracy"] for b in filled], align="edge", color="tab:red", alpha=0.25, hatch="//",
            label="gap to confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {calibration['ece']:.3f}, {calibration['n_samples']} predictions)")
    top.legend(loc="upper left")
    top.grid(True, alpha=0.3)
    bottom.bar([b["lower"] for b in bins], [b["count"] for b in bins], width=width, align="edge", edgecolor="black")
    bottom.set_xlabel("confidence (probability of the predicted label)")
    bottom.set_ylabel("predictions")
    return fig


def plot_reliability_diagram(calibration: dict, path: Path) -> Path:
    """Draw the reliability diagram into ``path`` (PNG, 150 DPI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    build_reliability_figure(calibration).savefig(path, dpi=LOSS_DPI)
    return path
