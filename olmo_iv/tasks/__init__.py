"""The paper's task suite: registry, prompts in both modes, BIG-bench rebuilds, token positions."""

from olmo_iv.tasks.registry import *  # noqa: F403
