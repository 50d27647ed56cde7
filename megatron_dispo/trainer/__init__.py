"""megatron_dispo.trainer"""
