"""``python -m bench.run --quick`` on the tiny GLM-4 writes every section's table (figures, not thresholds).

The dataset folder is a temporary one holding generated CMCC-style rows under the CMCC-34 file
names, so the accuracy section runs here whether or not the real data is on this machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.data.sample import generate_sample_dialogues, to_cmcc_csv
from app.domain.records import Record

SECTION_HEADINGS = {
    "tokens": "## 1. Tokens per sample",
    "train": "## 2. Training speed",
    "classify": "## 3. Serving",
    "accuracy": "## 4. Accuracy",
    "quality": "## 5. Quality",
}
NUMBER = r"\d+(?:\.\d+)?"


def _write_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "train_new_5shot.csv").write_text(to_cmcc_csv(generate_sample_dialogues(per_label=2, seed=5)),
                                                encoding="utf-8")
    rare = list(range(23, 34))
    (folder / "synthetic_upstream_glm4.csv").write_text(
        to_cmcc_csv(generate_sample_dialogues(per_label=7, seed=6, labels=rare)), encoding="utf-8")
    return folder


def _section(markdown: str, key: str) -> str:
    start = markdown.index(SECTION_HEADINGS[key])
    following = [markdown.index(h) for h in SECTION_HEADINGS.values() if markdown.find(h) > start]
    return markdown[start:min(following) if following else len(markdown)]


def _table_rows(section: str, first_cell: str, *, exact: bool = False) -> list[list[str]]:
    """Table rows whose first cell starts with (or, ``exact``, is) ``first_cell``."""
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and (cells[0] == first_cell if exact else cells[0].startswith(first_cell)):
            rows.append(cells)
    return rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from bench.run import main

    root = tmp_path_factory.mktemp("bench")
    out = root / "docs" / "benchmarks.md"
    code = main(["--quick", "--out", str(out), "--dataset-dir", str(_write_dataset(root / "cmcc34")),
                 "--data-dir", str(root / "data"), "--work-dir", str(root / "work")])
    assert code == 0
    return out, out.read_text(encoding="utf-8"), root


def test_report_header_names_machine_and_versions(quick_run):
    _, markdown, _ = quick_run
    assert markdown.startswith("# Benchmarks")
    for needle in ("- Date: ", " cores, ", "GiB RAM", "torch ", "transformers ", "peft ", "bitsandbytes ",
                   "Base model: tiny-glm4"):
        assert needle in markdown
    assert "not measured" not in markdown


def test_tokens_section_counts_all_three_ways(quick_run):
    _, markdown, _ = quick_run
    section = _section(markdown, "tokens")
    naive = _table_rows(section, "(b) system prompt")
    shared = _table_rows(section, "(c) shared prefix, training")
    legacy = _table_rows(section, "(a) old template")
    assert len(naive) == len(shared) == len(legacy) == 2  # one table per CMCC file
    for n_row, s_row in zip(naive, shared):
        assert float(s_row[1]) < float(n_row[1])  # the prefix counted once per 4 samples
    assert re.search(rf"\*\*{NUMBER} tokens of shared prefix\*\*", section)


def test_train_section_measures_both_paths(quick_run):
    _, markdown, _ = quick_run
    section = _section(markdown, "train")
    rows = {(r[3], r[4]): r for r in _table_rows(section, "tiny-glm4")}
    assert set(rows) == {(batch, path) for batch in ("4", "8") for path in ("naive", "shared")}
    for row in rows.values():
        assert float(row[6]) > 0 and float(row[8]) > 0  # s/step, samples/s
    for batch in ("4", "8"):
        naive, shared = rows[(batch, "naive")], rows[(batch, "shared")]
        # Same weights, same batch, no dropout: the first-step losses agree.
        assert float(naive[10]) == pytest.approx(float(shared[10]), rel=1e-3)
        assert re.match(rf"{NUMBER}x", shared[11])
        # The token bound: naive tokens over shared tokens, shown beside the speed-up.
        assert float(shared[13].rstrip("x")) == pytest.approx(float(naive[5]) / float(shared[5]), rel=0.01)
        assert re.match(r"\d+%", shared[14])
    bound = {batch: float(rows[(batch, "shared")][13].rstrip("x")) for batch in ("4", "8")}
    assert bound["8"] > bound["4"] > 1  # the prefix is run once for more samples


def test_serving_section_measures_every_strategy_through_the_api(quick_run):
    _, markdown, _ = quick_run
    section = _section(markdown, "classify")
    assert "LoRA adapter trained" in section  # the API served this run's adapter
    for name in ("generate", "score, full answers", "score, trie", "score, trie, lock"):
        (row,) = _table_rows(section, name, exact=True)
        assert float(row[1]) > 0 and float(row[2]) > 0  # p50, p95
        assert all(float(cell) > 0 for cell in row[3:6])  # texts/s at 1, 4, 16 clients
        assert re.fullmatch(r"\d+/2", row[7])
    trie = _table_rows(section, "score, trie", exact=True)[0]
    assert trie[7] == "0/2" and trie[8] == "2/2"  # scoring always returns a label
    assert float(trie[6]) < float(_table_rows(section, "score, full answers", exact=True)[0][6])  # fewer tokens
    assert _table_rows(section, "micro-batcher vs lock, texts/s at 16 clients")
    assert "vLLM rows: skipped (--quick)" in section


def test_accuracy_section_compares_adapter_and_baseline(quick_run):
    _, markdown, _ = quick_run
    section = _section(markdown, "accuracy")
    (baseline,) = _table_rows(section, "TF-IDF")
    (adapter,) = _table_rows(section, "LoRA adapter")
    for row in (baseline, adapter):
        assert 0.0 <= float(row[4]) <= 1.0 and 0.0 <= float(row[5]) <= 1.0
    assert "Train " in section and "held out" in section


def test_plots_and_raw_figures_are_written(quick_run):
    out, markdown, root = quick_run
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) == 5
    for relative in images:
        image = out.parent / relative
        assert image.read_bytes()[:4] == b"\x89PNG"
        assert image.stat().st_size < 300_000
    raw = json.loads((root / "work" / "quick_results.json").read_text(encoding="utf-8"))
    assert set(raw) == set(SECTION_HEADINGS)


def test_quality_section_has_class_balance_and_learning_curve(quick_run):
    out, markdown, _ = quick_run
    section = _section(markdown, "quality")
    summary = {r[0]: r for r in _table_rows(section, "class_balance=")
               if len(r) == 10}  # the summary table: one row per configuration
    assert set(summary) == {"class_balance=none", "class_balance=balanced"}
    for row in summary.values():
        assert row[1] == "2" and 0.0 <= float(row[6]) <= 1.0 and row[9] in ("yes", "no")
    curve = [r for r in _table_rows(section, "class_balance=") if len(r) == 8]
    assert [(r[0], r[1], r[2]) for r in curve] == [
        ("class_balance=none", "1", "4"), ("class_balance=none", "2", "8"),
        ("class_balance=balanced", "1", "4"), ("class_balance=balanced", "2", "8")]
    for row in curve:  # adapter and baseline measured at each point
        assert 0.0 <= float(row[4]) <= 1.0 and 0.0 <= float(row[7]) <= 1.0
    assert "Learning curve" in section
    # The linear head: trained per class-balance mode, cross-validated and on a learning curve beside the baseline.
    heads = {r[0]: r for r in _table_rows(section, "linear head, class_balance=") if len(r) == 7}
    assert set(heads) == {"linear head, class_balance=none", "linear head, class_balance=balanced"}
    for row in heads.values():
        assert float(row[1]) > 0 and all(0.0 <= float(v) <= 1.0 for v in row[2:6]) and row[6] in ("yes", "no")
    cv = {r[0]: r for r in _table_rows(section, "") if len(r) == 3 and r[0] in (
        "linear head, class_balance=none", "linear head, class_balance=balanced", "TF-IDF + LR baseline")}
    assert len(cv) == 3 and all(0.0 <= float(r[2]) <= 1.0 for r in cv.values())
    head_curve = [r for r in _table_rows(section, "16", exact=True) if len(r) == 5]
    assert head_curve and all(0.0 <= float(v) <= 1.0 for v in head_curve[0][1:])
    (plot,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
    assert plot.endswith("quick_quality.png") and (out.parent / plot).read_bytes()[:4] == b"\x89PNG"


def test_accuracy_is_skipped_cleanly_without_data(tmp_path):
    from bench.run import main

    out = tmp_path / "b.md"
    code = main(["--quick", "--sections", "tokens,accuracy", "--out", str(out),
                 "--dataset-dir", str(tmp_path / "absent"), "--data-dir", str(tmp_path / "data"),
                 "--work-dir", str(tmp_path / "work")])
    assert code == 0
    markdown = out.read_text(encoding="utf-8")
    assert "bundled sample (generated)" in markdown  # the token count fell back to the sample file
    assert "**not measured: the CMCC-34 files" in _section(markdown, "accuracy")
    assert SECTION_HEADINGS["train"] not in markdown


def test_stratified_split_keeps_held_out_rows_apart():
    from bench.data import stratified_split

    real = [Record(f"real {label} {i}", label) for label in range(5) for i in range(5 if label < 4 else 1)]
    synthetic = [Record(f"syn {label} {i}", label) for label in (3, 4) for i in range(10)]
    split = stratified_split(real, synthetic, held_out_per_label_real=1, held_out_per_label_synthetic=2,
                             train_per_label_synthetic=3, seed=1)
    assert not {r.dialogue for r in split.train} & {r.dialogue for r in split.held_out}
    held = [r.label_id for r in split.held_out]
    assert sorted(held) == [0, 1, 2, 3, 3, 3, 4, 4]  # label 4 has one real row: it stays in training
    assert len(split.train) == 4 * 4 + 1 + 2 * 3
    again = stratified_split(real, synthetic, held_out_per_label_real=1, held_out_per_label_synthetic=2,
                             train_per_label_synthetic=3, seed=1)
    assert [r.dialogue for r in again.held_out] == [r.dialogue for r in split.held_out]


def test_percentile_interpolates():
    from bench.report import percentile

    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([10.0, 0.0, 20.0], 100) == 20.0
