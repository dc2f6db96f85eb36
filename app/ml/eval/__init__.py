"""Evaluation: metrics, running a model over records, report files, plots, the TF-IDF baseline."""
