"""How bytes move between ranks: process groups named for their purpose, channels over them, one codec.

The lowest layer beside ``algorithms/``: it imports nothing from the package. Every collective the project issues
goes through a group registered here as ``host`` (gloo: metadata, CPU tensors, pickled objects) or ``device`` (the
model's tensors; NCCL on GPU, where CPU tensors cannot travel), so a GPU job never sends host data over NCCL.
"""

from megatron_dispo.comm.channel import BridgeError, Channel, GlooBridge, GroupChannel, StoreBridge
from megatron_dispo.comm.codec import (
    Column,
    TableHeader,
    broadcast_table,
    decode_table,
    encode_table,
    receive_buffers,
    recv_table,
    send_table,
)
from megatron_dispo.comm.groups import (
    GroupPurpose,
    group_purpose,
    host_world_group,
    init_host_world,
    new_host_group,
    register_group,
)

__all__ = [
    "BridgeError",
    "Channel",
    "Column",
    "GlooBridge",
    "GroupChannel",
    "GroupPurpose",
    "StoreBridge",
    "TableHeader",
    "broadcast_table",
    "decode_table",
    "encode_table",
    "group_purpose",
    "host_world_group",
    "init_host_world",
    "new_host_group",
    "receive_buffers",
    "recv_table",
    "register_group",
    "send_table",
]
