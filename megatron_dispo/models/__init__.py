"""megatron_dispo.models"""
