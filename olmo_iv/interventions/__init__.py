"""Interventions on the forward pass: activation patching (and, later, steering)."""
