"""megatron_dispo.rollout"""
