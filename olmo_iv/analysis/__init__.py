"""Analyses that return data: superadditivity statistics, probes and LDA, path tracing."""
