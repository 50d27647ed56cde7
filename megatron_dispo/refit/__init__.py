"""megatron_dispo.refit"""
