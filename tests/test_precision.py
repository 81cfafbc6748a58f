"""The one dtype policy on described CPUs (an AVX-512 one with native bf16, an AVX2 one without)
and on this machine: storage, prefill and training dtypes, prepacking, the decode and batch
kernels, and the line printed at start."""

import os
import subprocess
import sys

import pytest
import torch

from havoc_core import HavocError
from havoc_core.precision import AVX2_EMULATION, CpuInfo, plan_inference, training_dtype

AVX512 = CpuInfo("AVX512", native_bf16=True, vnni=True)
AVX2 = CpuInfo("AVX2", native_bf16=False)
SMALL, LARGE = 5_000_000, 2_000_000_000


@pytest.fixture(params=[AVX512, AVX2], ids=["avx512-bf16", "avx2"])
def cpu(request) -> CpuInfo:
    return request.param


def plan(n_params: int, **kwargs):
    return plan_inference(n_params, device=kwargs.pop("device", "cpu"), **kwargs)


def test_storage_dtype_follows_size_and_hardware(cpu):
    native = cpu.native_bf16
    assert plan(SMALL, cpu=cpu).weights == (torch.bfloat16 if native else torch.float32)
    assert plan(LARGE, cpu=cpu).weights == torch.bfloat16  # one stream's decode reads half the bytes
    # serving: int8 (without native bf16 fbgemm's 8-row matmuls are 5x packed fp32's, 13x emulated
    # bf16's; with it a batch-8 step is 1.3x packed bf16's)
    serving = plan(LARGE, cpu=cpu, batching=True)
    assert (serving.weights, serving.quantize) == (torch.float32, "int8")
    assert plan(LARGE, cpu=AVX2, batching=True, dtype="bfloat16").quantize is None  # --dtype keeps float weights
    assert plan(SMALL, cpu=cpu, quantize="int8").weights == torch.float32  # fbgemm takes fp32
    assert plan(SMALL, cpu=cpu, quantize="int4").weights == torch.float32  # HAVOC's int4 kernel: fp32 activations
    assert plan(SMALL, cpu=CpuInfo("DEFAULT", False), quantize="int4").weights == torch.bfloat16  # ATen's int4pack
    assert plan(SMALL, device="cuda", cpu=cpu).weights == torch.bfloat16
    assert plan(LARGE, cpu=cpu, batching=True, dtype="bfloat16").weights == torch.bfloat16  # --dtype wins


def test_prefill_runs_fp32_where_bf16_is_emulated(cpu):
    assert plan(LARGE, cpu=cpu).prefill == (torch.bfloat16 if cpu.native_bf16 else torch.float32)
    assert plan(LARGE, device="cuda").prefill == torch.bfloat16


def test_packing_when_batching_or_small_fp32(cpu):
    assert plan(LARGE, cpu=AVX512, batching=True, dtype="bfloat16").pack
    assert plan(LARGE, cpu=AVX2, batching=True, dtype="float32").pack
    assert not plan(LARGE, cpu=cpu).pack  # chat of a big model keeps one copy
    assert plan(SMALL, cpu=cpu, dtype="float32").pack
    assert not plan(SMALL, cpu=cpu, batching=True, pack=False).pack  # --no-prepack
    assert not plan(SMALL, cpu=cpu, batching=True, quantize="int8").pack  # int8 has fbgemm's own layout
    assert not plan(SMALL, device="cuda", batching=True).pack
    assert not plan(LARGE, cpu=AVX2, batching=True, dtype="bfloat16").pack  # no packed emulated bf16


def test_training_dtype_follows_the_hardware(cpu):
    host = torch.device("cpu")
    assert training_dtype("float32", host, cpu) == torch.float32
    assert training_dtype("bfloat16", host, cpu) == torch.bfloat16
    assert training_dtype("auto", host, cpu) == (torch.bfloat16 if cpu.native_bf16 else torch.float32)
    assert training_dtype("auto", torch.device("cuda"), cpu) == torch.bfloat16


def test_the_plan_says_what_it_chose():
    assert plan(SMALL, cpu=AVX512, quantize="int8", batching=True).describe() == \
        "cpu (AVX512, native bf16): decode int8 (fbgemm), batch int8 (fbgemm), prefill fp32"
    assert plan(LARGE, cpu=AVX2, batching=True).describe() == \
        "cpu (AVX2, no native bf16): decode int8 (fbgemm), batch int8 (fbgemm), prefill fp32"
    assert plan(LARGE, cpu=AVX2, batching=True, dtype="float32").describe() == \
        "cpu (AVX2, no native bf16): decode fp32 packed (oneDNN), batch fp32 packed (oneDNN), prefill fp32"
    assert plan(LARGE, cpu=AVX2).describe() == "cpu (AVX2, no native bf16): decode bf16 (ATen), prefill fp32"
    assert plan(LARGE, cpu=AVX512, batching=True).describe() == \
        "cpu (AVX512, native bf16): decode int8 (fbgemm), batch int8 (fbgemm), prefill fp32"
    assert plan(LARGE, cpu=AVX512, batching=True, dtype="bfloat16").describe() == \
        "cpu (AVX512, native bf16): decode bf16 packed (oneDNN), batch bf16 packed (oneDNN), prefill bf16"
    assert plan(LARGE, cpu=AVX512, quantize="int4").describe() == \
        "cpu (AVX512, native bf16): decode int4 (HAVOC avx512-vnni), prefill bf16 (int4 dequantized)"
    assert plan(LARGE, cpu=AVX2, quantize="int4").describe() == \
        "cpu (AVX2, no native bf16): decode int4 (HAVOC avx2), prefill fp32"
    assert plan(SMALL, device="cuda").describe() == "cuda: decode bf16, prefill bf16"
    # int8 in a one-slot engine (chat) runs HAVOC's kernel; batching engines fbgemm's (faster on 8 rows)
    assert plan(SMALL, cpu=AVX512, quantize="int8").describe() == \
        "cpu (AVX512, native bf16): decode int8 (HAVOC avx512-vnni), prefill bf16 (int8 dequantized)"
    assert plan(SMALL, cpu=AVX2, quantize="int8").describe() == \
        "cpu (AVX2, no native bf16): decode int8 (HAVOC avx2), prefill fp32"


def test_the_quant_kernel_follows_the_cpu(monkeypatch):
    """HAVOC's int4 and int8 kernels: their VNNI build where torch runs AVX-512 on a CPU with VNNI,
    their AVX2 build on AVX2 (and AVX-512 without VNNI), ATen's int4pack and fbgemm's int8 elsewhere
    or when asked for."""
    def int4(cpu: CpuInfo) -> str:
        return plan(LARGE, cpu=cpu, quantize="int4").kernels(1)

    def int8(cpu: CpuInfo) -> str:
        return plan(LARGE, cpu=cpu, quantize="int8").kernels(1)

    assert int4(AVX512) == "int4 (HAVOC avx512-vnni)"
    assert int4(CpuInfo("AVX512", native_bf16=False)) == "int4 (HAVOC avx2)"
    assert int4(AVX2) == "int4 (HAVOC avx2)"
    assert int4(CpuInfo("DEFAULT", native_bf16=False)) == "int4 (ATen int4pack)"
    assert int8(AVX512) == "int8 (HAVOC avx512-vnni)" and int8(AVX2) == "int8 (HAVOC avx2)"
    assert int8(CpuInfo("DEFAULT", native_bf16=False)) == "int8 (fbgemm)"
    monkeypatch.setenv("HAVOC_OWN_KERNELS", "0")
    assert int4(AVX512) == "int4 (ATen int4pack)" and int8(AVX512) == "int8 (fbgemm)"


def test_this_machine_is_described_as_torch_runs_it():
    """The description is read from torch, so the AVX2 emulation the benchmarks use (ATen's AVX2
    kernels, oneDNN and fbgemm capped at AVX2) is seen as an AVX2 CPU without native bf16."""
    here = CpuInfo.detect()
    assert here.capability == torch.backends.cpu.get_cpu_capability()
    code = "from havoc_core.precision import CpuInfo; print(CpuInfo.detect())"
    env = {**os.environ, **AVX2_EMULATION}
    emulated = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    if here.capability in ("AVX2", "AVX512"):  # x86: the emulation applies
        assert emulated.stdout.strip() == "AVX2, no native bf16"


def test_bad_choices_are_one_line_errors():
    with pytest.raises(HavocError, match="dtype: expected auto or one of float32, bfloat16, float16, found 'fp8'"):
        plan_inference(1, dtype="fp8")
    with pytest.raises(HavocError, match="quantize: expected int8"):
        plan_inference(1, quantize="int3")  # type: ignore[arg-type]
