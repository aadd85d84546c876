"""Evaluations: task inference (exact match, instructional accuracy, judges) and IFEval, offline."""
