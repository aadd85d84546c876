"""The shipped toy models: their training recipe and checks."""
