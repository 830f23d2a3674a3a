"""PAPER.md 4.3 as a game: iterative RLHF on transformers models."""
