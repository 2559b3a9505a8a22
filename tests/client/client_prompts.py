"""Prompts shared by the client tests (tiny test tokenizer: CLEAN and CORRUPT are 8 tokens)."""

CLEAN = "The capital of Spain is"
CORRUPT = "The capital of Italy is"  # same token length as CLEAN
CORRUPT_LONGER = "The capital of France is"  # 10 tokens: prefix/suffix alignment
