"""A replica's captured MoE routing as the bytes its leader sends the driver: 1 byte per expert id when they fit.

Routing is ``[tokens, moe_layers, top_k]`` expert ids per response, ``NO_ROUTE`` (-1) where the engine reported none.
At the 30B-A3B recipe's shape (48 layers x top-8, ~22k tokens per response) int64 made it ~8.4 MB per response; the
ids need 7 bits for 128 experts. So the payload is ``uint8`` codes when ``num_experts < 256`` (255 stands for
``NO_ROUTE``; 256 experts would leave no code for it) and ``int16`` otherwise, preceded by an 8-byte header
(``layers``, ``top_k`` as int32). Only a replica's leader sends it (its TP followers hold the same routing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_dispo.rollout.routing_capture import NO_ROUTE

__all__ = ["decode_routing", "encode_routing", "routing_code_dtype"]

_UINT8_NO_ROUTE = 255
_HEADER_BYTES = 8


def routing_code_dtype(num_experts: int) -> torch.dtype:
    """``uint8`` when every expert id and ``NO_ROUTE`` fit in a byte (fewer than 256 experts), else ``int16``."""
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1 (a MoE model).")
    return torch.uint8 if num_experts < _UINT8_NO_ROUTE + 1 else torch.int16


def encode_routing(routed: Sequence[torch.Tensor], num_experts: int) -> torch.Tensor:
    """Every response's ``[rows, layers, k]`` routing as one flat ``uint8`` byte tensor (header, then the codes)."""
    layers, top_k = (int(v) for v in routed[0].shape[1:]) if routed else (0, 0)
    header = torch.tensor([layers, top_k], dtype=torch.int32).view(torch.uint8)
    if not routed:  # a replica dealt no prompts
        return header
    flat = torch.cat([rows.reshape(-1) for rows in routed])
    if routing_code_dtype(num_experts) == torch.uint8:
        codes = torch.where(flat == NO_ROUTE, _UINT8_NO_ROUTE, flat).to(torch.uint8)
    else:
        codes = flat.to(torch.int16).contiguous().view(torch.uint8)
    return torch.cat([header, codes])


def decode_routing(data: torch.Tensor, rows: Sequence[int], num_experts: int) -> list[torch.Tensor]:
    """Inverse of :func:`encode_routing`: int16 ``[rows[i], layers, k]`` per response, ``NO_ROUTE`` restored."""
    if not rows:
        return []
    layers, top_k = (int(v) for v in data[:_HEADER_BYTES].contiguous().view(torch.int32))
    body = data[_HEADER_BYTES:]
    if routing_code_dtype(num_experts) == torch.uint8:
        flat = body.to(torch.int16)
        flat[body == _UINT8_NO_ROUTE] = NO_ROUTE
    else:
        flat = body.contiguous().view(torch.int16)
    sizes = [count * layers * top_k for count in rows]
    return [chunk.reshape(count, layers, top_k) for chunk, count in zip(flat.split(sizes), rows, strict=True)]
