"""Evaluations of model outputs that run offline (IFEval)."""
