"""``python -m bench.run --sections train --update`` (``make bench SECTIONS=train``) replaces only the sections it
re-ran in the existing report, each headed by the run it comes from; the other sections stay byte for byte."""

from __future__ import annotations

import argparse

from bench.env import describe_environment
from bench.report import SectionResult, Table
from bench.run import update_sections

EXISTING = """# Benchmarks

- Date: 2026-11-24 09:51 UTC

## 1. Tokens per sample

old tokens table

## 2. Training speed and peak memory: naive vs shared prefix

old training table, batch 4 only

## 3. /classify latency and throughput: generate vs score

old classify table
"""


def _train_result() -> SectionResult:
    return SectionResult("train", "2. Training speed and peak memory: naive vs shared prefix",
                         intro=["new method"], tables=[Table(["batch", "speed-up", "token bound"], [[16, 2.5, 2.7]])],
                         seconds=12.0)


def test_update_replaces_only_the_re_run_section_and_dates_it(tmp_path):
    environment = describe_environment()
    args = argparse.Namespace(sections=["train"])
    updated = update_sections(EXISTING, {"train": _train_result()}, environment, args, tmp_path)

    assert "old training table" not in updated
    assert "| 16 | 2.50 | 2.70 |" in updated
    assert updated.count("## 2. Training speed") == 1
    before, after = EXISTING.split("## 2.")[0], EXISTING.split("## 3.")[1]
    assert updated.startswith(before)  # the header and section 1 as they were
    assert updated.endswith("## 3." + after)  # section 3 as it was
    section = updated.split("## 2.")[1].split("## 3.")[0]
    assert "--sections train --update" in section
    assert f"- Date: {environment.date}" in section


def test_update_appends_a_section_the_report_lacks(tmp_path):
    without_train = EXISTING.replace("## 2. Training speed and peak memory: naive vs shared prefix\n\n"
                                     "old training table, batch 4 only\n\n", "")
    updated = update_sections(without_train, {"train": _train_result()}, describe_environment(),
                              argparse.Namespace(sections=["train"]), tmp_path)
    assert updated.rstrip().endswith("_Section wall time: 12 s._")
    assert "old classify table" in updated
