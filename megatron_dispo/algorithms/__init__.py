"""megatron_dispo.algorithms"""
