"""Confusion matrix and loss-curve figures: valid PNGs, the right DPI, one tick per class, Chinese glyphs."""

from __future__ import annotations

import warnings

import pytest
from PIL import Image

from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.ml.eval import plots


def _matrix(n):
    return [[(7 if i == j else (i * 3 + j) % 4) for j in range(n)] for i in range(n)]


def test_confusion_figure_has_one_tick_per_class_with_chinese_names():
    n = len(CMCC34_LABEL_SET)
    fig = plots.build_confusion_matrix_figure(_matrix(n), CMCC34_LABEL_SET)
    ax = fig.axes[0]
    assert len(ax.get_xticks()) == n and len(ax.get_yticks()) == n
    xlabels = [t.get_text() for t in ax.get_xticklabels()]
    ylabels = [t.get_text() for t in ax.get_yticklabels()]
    assert xlabels == ylabels
    assert plots.cjk_font_family() is not None  # mplfonts ships Noto Sans CJK SC
    assert xlabels[12] == "12 投诉（含抱怨）费用问题"


def test_confusion_png_is_valid_300_dpi_without_missing_glyphs(tmp_path):
    n = len(CMCC34_LABEL_SET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = plots.plot_confusion_matrix(_matrix(n), CMCC34_LABEL_SET, tmp_path / "cm.png")
    glyph_warnings = [str(w.message) for w in caught if "missing from" in str(w.message) or "Glyph" in str(w.message)]
    assert glyph_warnings == []
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.info["dpi"] == pytest.approx((300, 300), abs=0.05)  # PNG stores whole pixels per metre
        assert min(image.size) > 3000  # 34 classes need room at 300 DPI


def test_without_cjk_font_ticks_fall_back_to_ids_with_a_legend(monkeypatch):
    monkeypatch.setattr(plots, "cjk_font_family", lambda: None)
    labels = CMCC34_LABEL_SET
    fig = plots.build_confusion_matrix_figure(_matrix(len(labels)), labels)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in labels.ids]
    legend = "\n".join(t.get_text() for t in fig.texts)
    assert "12: 投诉（含抱怨）费用问题" in legend


def test_confusion_matrix_shape_must_match_label_set():
    with pytest.raises(ValueError):
        plots.build_confusion_matrix_figure([[1, 0], [0, 1]], CMCC34_LABEL_SET)


def test_loss_curve_plots_steps_against_loss_at_150_dpi(tmp_path):
    history = [{"step": s, "loss": 4.0 / s, "learning_rate": 1e-4} for s in range(1, 21)]
    history.append({"step": 20, "eval_loss": 0.5})  # an eval entry has no training loss
    fig = plots.build_loss_figure(history)
    ax = fig.axes[0]
    train_line = ax.get_lines()[0]
    assert list(train_line.get_xdata()) == list(range(1, 21))
    assert list(train_line.get_ydata()) == pytest.approx([4.0 / s for s in range(1, 21)])
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss" and ax.get_title()
    path = plots.plot_loss_curve(history, tmp_path / "loss.png")
    with Image.open(path) as image:
        assert image.info["dpi"] == pytest.approx((150, 150), abs=0.05)  # PNG stores whole pixels per metre


def test_empty_history_still_draws(tmp_path):
    path = plots.plot_loss_curve([], tmp_path / "empty.png")
    with Image.open(path) as image:
        image.verify()
