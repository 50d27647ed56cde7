"""megatron_dispo.rewards"""
