"""Iterative RLHF with FPO on transformers models (PAPER.md section 4.3): `stackelberg run llm/fpo-relaxed`."""
from .game import LLMRLHFGame

Game = LLMRLHFGame
