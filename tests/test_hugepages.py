"""Kernel layouts in huge pages (``hugepages``, ``inference.layouts_in_huge_pages``): the copies hold
the same values, on cache lines, outlive the originals, sit in private memory advised to use huge
pages, and a one-slot engine (a chat) sets them up with an fp32 KV cache."""

import copy
import gc
import sys
from pathlib import Path

import pytest
import torch

from havoc_core import quant_kernel
from havoc_core.engine import Engine
from havoc_core.hugepages import HugePageBlock, aligned
from havoc_core.inference import InferenceLinear, prepare_model
from havoc_core.sampling import SamplingParams


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    block = HugePageBlock(sum(aligned(t.numel() * t.element_size()) for t in tensors))
    return [block.copy(t) for t in tensors]


def test_copies_hold_the_values_on_cache_lines_and_outlive_the_originals():
    tensors = [torch.randn(300, 70), torch.arange(999, dtype=torch.uint8).view(27, 37),
               torch.randn(5).bfloat16(), torch.randn(2, 3, 4)[:, 0].contiguous()]
    want = [t.clone() for t in tensors]
    got = copies(tensors)
    del tensors
    gc.collect()
    [torch.randn(10_000) for _ in range(20)]  # reuse of freed memory would show below
    for copy_, expected in zip(got, want, strict=True):
        assert torch.equal(copy_, expected) and copy_.dtype == expected.dtype and copy_.is_contiguous()
        assert copy_.data_ptr() % 64 == 0
    assert len({c.untyped_storage().data_ptr() for c in got}) == 1  # one block
    with pytest.raises(AssertionError, match="block full"):
        HugePageBlock(64).copy(torch.zeros(65, dtype=torch.uint8))


@pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are Linux's")
def test_the_block_is_private_memory_advised_to_use_huge_pages():
    """Whether the kernel then hands out 2 MB pages depends on its free memory (a busy machine may
    have none), so this checks what HAVOC controls: the advice, on private memory (shared anonymous
    memory is shmem, which THP's "madvise" setting leaves in 4 KB pages)."""
    (copy_,) = copies([torch.ones(6 << 20, dtype=torch.uint8)])  # (held: the mapping lives with it)
    flags = vm_flags(copy_.data_ptr())
    assert "hg" in flags and "sh" not in flags, flags
    assert int(copy_.sum()) == 6 << 20


def test_one_slot_engine_puts_kernel_layouts_in_huge_pages_and_keys_in_fp32(model, tok, prompt_ids):
    if not isinstance(quant_kernel.load(), quant_kernel.Kernel):
        pytest.skip("HAVOC's kernel is not built here")
    int4 = prepare_model(copy.deepcopy(model), torch.bfloat16, "int4")
    ids = prompt_ids("The import statement")
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    before = [m.int4[0].clone() for m in int4.modules() if isinstance(m, InferenceLinear) and m.int4 is not None]
    engine = Engine(int4, tok)
    layers = [m for m in int4.modules() if isinstance(m, InferenceLinear)]
    layouts = [m.int4[0] for m in layers if m.int4 is not None] + [m._own for m in layers if m.scale is not None]
    assert len(layouts) == 4 * len(int4.layers) + 1  # qkv, o, gate/up, down per layer; the int8 head
    assert engine.cache.k[0].dtype == torch.float32
    assert Engine(int4, tok, max_batch=2).cache.k[0].dtype == torch.bfloat16  # (batching engines: as the weights)
    if sys.platform == "linux":
        assert len({t.untyped_storage().data_ptr() for t in layouts}) == 1
    after = [m.int4[0] for m in layers if m.int4 is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    tokens = engine.generate([ids], params)[0].ids
    assert Engine(int4, tok).generate([ids], params)[0].ids == tokens  # a second engine: nothing moved twice
