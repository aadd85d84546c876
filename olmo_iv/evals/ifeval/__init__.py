"""IFEval (Zhou et al. 2023), offline: the 25 official checkers, strict and loose scoring, the official formats.

    from olmo_iv.evals import ifeval
    rows = ifeval.score_file("responses.jsonl")          # matched by prompt to the vendored 541 prompts
    rows = ifeval.score_responses(list_of_541_strings)    # in the inputs' order, e.g. from a model
    summary = ifeval.summarize(rows)                      # prompt- and instruction-level accuracy, strict and loose
"""

from olmo_iv.evals.ifeval import text
from olmo_iv.evals.ifeval.checkers import INSTRUCTIONS, Instruction, check_instruction, validate_kwargs
from olmo_iv.evals.ifeval.scoring import (
    InputExample,
    ScoredRow,
    default_input_data,
    load_input_data,
    loose_variants,
    match_responses,
    read_responses,
    score_example,
    score_file,
    score_responses,
    summarize,
)

__all__ = ["INSTRUCTIONS", "InputExample", "Instruction", "ScoredRow", "check_instruction", "default_input_data",
           "load_input_data", "loose_variants", "match_responses", "read_responses", "score_example", "score_file",
           "score_responses", "summarize", "text", "validate_kwargs"]
