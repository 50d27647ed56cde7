"""CPU tests for megatron_dispo.refit.buckets: size-capped lazy bucketing, fused-group cuts, flat packing round trip."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch

from megatron_dispo.refit.buckets import BUFFER_ALIGNMENT, iter_buckets, pack_bucket, plan_layout, unpack_bucket

NUM_GPUS = 0


def _bytes_tensors(sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.full((size,), i, dtype=torch.uint8)) for i, size in enumerate(sizes)]


def test_buckets_respect_size_and_put_big_tensors_alone() -> None:
    # 100+200 = 300 fits a 300-byte bucket; 50 would make 350 -> new bucket; 1000 > 300 goes alone; 30 closes.
    buckets = list(iter_buckets(_bytes_tensors([100, 200, 50, 1000, 30]), 300))
    assert [[name for name, _ in bucket] for bucket in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


def test_buckets_never_cut_a_fused_group() -> None:
    # q/k/v form one group of 3; with a 250-byte cap a plain cut would fall between q and k.
    stream = [
        ("a.norm", torch.zeros(200, dtype=torch.uint8)),
        ("a.q", torch.zeros(100, dtype=torch.uint8)),
        ("a.k", torch.zeros(100, dtype=torch.uint8)),
        ("a.v", torch.zeros(100, dtype=torch.uint8)),
        ("b.norm", torch.zeros(10, dtype=torch.uint8)),
    ]

    def group_of(name: str) -> str:
        return "a.qkv" if name in ("a.q", "a.k", "a.v") else name

    buckets = list(iter_buckets(stream, 250, group_of=group_of, group_sizes={"a.qkv": 3}))
    # norm (200) + q would be 300 > 250 -> cut before q; q,k,v stay together (300 > cap, allowed); b.norm: new bucket.
    assert [[name for name, _ in bucket] for bucket in buckets] == [["a.norm"], ["a.q", "a.k", "a.v"], ["b.norm"]]


def test_bucketing_is_lazy_and_keeps_at_most_one_bucket_plus_one_tensor_alive() -> None:
    alive: list[weakref.ref[torch.Tensor]] = []
    pulled = [0]

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for index in range(12):
            tensor = torch.zeros(64, dtype=torch.float32)  # 256 bytes
            alive.append(weakref.ref(tensor))
            pulled[0] += 1
            yield f"w{index}", tensor
            del tensor

    max_alive = 0
    for bucket in iter_buckets(stream(), 1024):  # 4 tensors per bucket
        assert len(bucket) == 4
        assert pulled[0] <= len(bucket) * (len(alive) // 4) + 1  # never more than one tensor ahead
        gc.collect()
        max_alive = max(max_alive, sum(ref() is not None for ref in alive))
        del bucket
    assert max_alive <= 4 + 1


def test_bucketing_pulls_exactly_one_tensor_ahead() -> None:
    pulled: list[str] = []

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for index in range(6):
            pulled.append(f"w{index}")
            yield f"w{index}", torch.zeros(10, dtype=torch.uint8)

    iterator = iter_buckets(stream(), 20)
    first = next(iterator)
    assert [name for name, _ in first] == ["w0", "w1"]
    assert pulled == ["w0", "w1", "w2"]  # w2 did not fit: pulled, held for the next bucket


def test_duplicate_names_and_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        list(iter_buckets([("x", torch.zeros(1)), ("x", torch.zeros(1))], 100))
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets([], 0))
    with pytest.raises(TypeError, match=r"expected torch\.Tensor"):
        list(iter_buckets([("x", [1.0])], 100))  # type: ignore[list-item]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_pack_unpack_round_trip_is_bit_exact_for_every_dtype() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=generator)
    named = [
        ("fp32", base),
        ("bf16", base.to(torch.bfloat16)),
        ("fp16_transposed", base.to(torch.float16).t()),  # non-contiguous input
        ("fp8", (base * 10).to(torch.float8_e4m3fn)),
        ("int64", torch.arange(3, dtype=torch.int64)),
        ("bool", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.empty(0, 4)),
    ]
    packed = pack_bucket(named)
    assert packed.buffer.dtype == torch.uint8 and packed.buffer.dim() == 1
    assert all(slot.offset % BUFFER_ALIGNMENT == 0 for slot in packed.layout.slots)
    assert packed.layout.payload_bytes == sum(t.numel() * t.element_size() for _, t in named)
    restored = unpack_bucket(packed.buffer, packed.layout)
    assert [name for name, _ in restored] == [name for name, _ in named]
    for (_, original), (_, copy) in zip(named, restored, strict=True):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(_bits(copy), _bits(original))
    # views, not copies: writing the buffer changes the unpacked tensor
    packed.buffer[packed.layout.slots[0].offset : packed.layout.slots[0].offset + 4].zero_()
    assert restored[0][1].reshape(-1)[0].item() == 0.0


def test_layout_offsets_are_closed_form() -> None:
    # 10 fp32 = 40 B at 0; next aligned to 256; 300 B of uint8 at 256 -> ends 556 -> total aligned to 768.
    layout = plan_layout([("a", torch.zeros(10)), ("b", torch.zeros(300, dtype=torch.uint8))])
    assert [(slot.offset, slot.nbytes) for slot in layout.slots] == [(0, 40), (256, 300)]
    assert layout.total_bytes == 768


def test_unpack_rejects_a_buffer_of_the_wrong_size() -> None:
    packed = pack_bucket([("a", torch.ones(4))])
    with pytest.raises(ValueError, match="different buckets or the transfer was truncated"):
        unpack_bucket(packed.buffer[:-1], packed.layout)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bucket(packed.buffer.view(torch.float32), packed.layout)
