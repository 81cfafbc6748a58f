"""Kernel layouts in huge pages (``hugepages``, ``inference.prepare_one_slot``): the copies hold the
same values, on cache lines, outlive the originals, really sit in huge pages where the kernel
offers them, and a one-slot engine (a chat) sets them up with an fp32 KV cache."""

import copy
import gc
import sys
from pathlib import Path

import pytest
import torch

from havoc_core import quant_kernel
from havoc_core.engine import Engine
from havoc_core.hugepages import huge_page_copies
from havoc_core.inference import InferenceLinear, prepare_model
from havoc_core.sampling import SamplingParams

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_copies_hold_the_values_on_cache_lines_and_outlive_the_originals():
    tensors = [torch.randn(300, 70), torch.arange(999, dtype=torch.uint8).view(27, 37),
               torch.randn(5).bfloat16(), torch.randn(2, 3, 4)[:, 0].contiguous()]
    want = [t.clone() for t in tensors]
    copies = huge_page_copies(tensors)
    del tensors
    gc.collect()
    [torch.randn(10_000) for _ in range(20)]  # reuse of freed memory would show below
    for got, expected in zip(copies, want, strict=True):
        assert torch.equal(got, expected) and got.dtype == expected.dtype and got.is_contiguous()
        assert got.data_ptr() % 64 == 0
    if sys.platform == "linux":
        assert len({c.untyped_storage().data_ptr() for c in copies}) == 1  # one mapping


@pytest.mark.skipif(sys.platform != "linux" or not THP.exists() or "[never]" in THP.read_text(),
                    reason="no transparent huge pages here")
def test_copies_sit_in_huge_pages():
    before = anon_huge_kb()
    copies = huge_page_copies([torch.ones(6 << 20, dtype=torch.uint8)])
    assert anon_huge_kb() - before >= 4096, "6 MB copied, not even two 2 MB pages"
    assert int(copies[0].sum()) == 6 << 20


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
