"""megatron_dispo.data"""
