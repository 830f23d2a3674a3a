"""Concrete games built on the stackelberg framework (installed as `stackelberg_games`; see docs/packaging)."""
