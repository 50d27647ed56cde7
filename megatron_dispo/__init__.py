"""megatron_dispo: Megatron-scale RL for LLM math reasoning with DISPO (arXiv 2602.00983)."""

__version__ = "0.1.0"
