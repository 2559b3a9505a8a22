"""Text utilities: tokenizer access, spans, alignment (shared by server and client)."""
