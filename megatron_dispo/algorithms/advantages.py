"""Group-relative advantages (DISPO Eq. 3; GRPO, arXiv 2402.03300).

Responses come in contiguous groups of G (the G samples of one prompt): rows [0, G) are prompt 0, [G, 2G) prompt 1...

    A_i = (R_i - mean_group(R)) / std_group(R)      (scale_by_std=True; population std, i.e. divide by G)
    A_i =  R_i - mean_group(R)                      (scale_by_std=False; Dr. GRPO, arXiv 2503.20783)

A group whose rewards are all equal (std = 0) carries no learning signal: its advantages are exactly 0, never NaN.

With a validity mask (``valid``), invalid responses (e.g. a verifier timeout under ``reward.on_verifier_failure:
drop``) leave their group: mean and std are over the valid members only (G_valid of them), invalid members get
advantage 0, and a group with fewer than two valid members, or whose valid rewards are all equal, gets 0 throughout.
"""

from __future__ import annotations

import torch


def group_relative_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale_by_std: bool = True,
    std_eps: float = 0.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-response advantages, shape like `rewards` ([num_groups * group_size]).

    Args:
        rewards: [num_groups * group_size] scalar reward per response, groups contiguous.
        group_size: G, responses per prompt (>= 1).
        scale_by_std: divide by the group's population std (GRPO/DISPO) or not (Dr. GRPO).
        std_eps: added to the std before dividing (0 = exact Eq. 3); zero-std groups give 0 either way.
        valid: optional bool mask like `rewards`; False removes a response from its group (advantage 0, not in the
            group's mean/std). Its reward may then be anything, NaN included. None: every response counts.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}.")
    if rewards.dim() != 1:
        raise ValueError(f"rewards has shape {list(rewards.shape)}; expected [num_groups * group_size] (1-D).")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.float32)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an int >= 1 (responses per prompt).")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; groups must be "
            "complete contiguous blocks of group_size responses."
        )
    if not isinstance(std_eps, int | float) or std_eps < 0:
        raise ValueError(f"std_eps={std_eps!r} must be a number >= 0.")
    if valid is not None:
        return _masked_group_advantages(rewards, group_size, valid, scale_by_std=scale_by_std, std_eps=std_eps)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf; check the verifier / reward shaping.")
    groups = rewards.reshape(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centered.reshape(-1)
    std = groups.std(dim=1, keepdim=True, unbiased=False)
    # an exactly constant group has centered == 0; tiny float residue is zeroed by the where as well
    constant = std == 0
    advantages = torch.where(
        constant, torch.zeros_like(centered), centered / (std + std_eps).masked_fill(constant, 1.0)
    )
    return advantages.reshape(-1)


def _masked_group_advantages(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor, *, scale_by_std: bool, std_eps: float
) -> torch.Tensor:
    """`group_relative_advantages` over the valid members of each group only (invalid members get exactly 0)."""
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a torch.bool tensor, got {getattr(valid, 'dtype', type(valid).__name__)}.")
    if valid.shape != rewards.shape:
        raise ValueError(f"valid has shape {list(valid.shape)}; expected the shape of rewards, {list(rewards.shape)}.")
    valid = valid.to(rewards.device)
    if not bool(torch.isfinite(rewards[valid]).all()):
        raise ValueError("rewards of valid responses contain NaN or inf; check the verifier / reward shaping.")
    mask = valid.reshape(-1, group_size)
    groups = torch.where(mask, rewards.reshape(-1, group_size), torch.zeros((), dtype=rewards.dtype))
    count = mask.sum(dim=1, keepdim=True).clamp_min(1).to(rewards.dtype)
    mean = groups.sum(dim=1, keepdim=True) / count
    centered = torch.where(mask, groups - mean, torch.zeros((), dtype=rewards.dtype))
    # "no signal" is decided on the rewards themselves (valid max == valid min), not on a float std that may keep
    # residue: it covers groups with 0 or 1 valid members and groups whose valid rewards are all equal.
    highest = torch.where(mask, groups, -torch.inf).amax(dim=1, keepdim=True)
    lowest = torch.where(mask, groups, torch.inf).amin(dim=1, keepdim=True)
    no_signal = highest <= lowest
    if scale_by_std:
        std = (centered.square().sum(dim=1, keepdim=True) / count).sqrt()
        centered = centered / (std + std_eps).masked_fill(no_signal, 1.0)
    return torch.where(no_signal, torch.zeros_like(centered), centered).reshape(-1)
