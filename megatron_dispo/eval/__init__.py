"""megatron_dispo.eval"""
