"""The tables runs write and read: patching.csv's columns and the float format."""

from __future__ import annotations

COLUMNS = ("model", "task", "mode", "sample", "query", "answer", "answer_id", "layers", "n_layers", "target_pos",
           "rank_clean", "rr_clean", "logit_clean", "rank_target", "rr_target", "logit_target",
           "rank_patched", "rr_patched", "logit_patched", "rr_diff", "logit_diff")
"""Columns of patching.csv: one row per (model, task, sample, layer set, target position)."""


def fmt_float(x: float) -> str:
    """The shortest decimal form that reads back as the same double: a CSV loses nothing."""
    return repr(float(x))
