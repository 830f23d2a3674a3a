"""Iterative RLHF with FPO on transformers models (its LLM experiment): `stackelberg run llm/fpo-relaxed`."""
from .game import LLMRLHFGame

Game = LLMRLHFGame
