"""The one dtype policy, on this machine and on faked CPU descriptions (with and without native
bf16): storage, prefill and training dtypes, prepacking, and the line printed at start."""

import pytest
import torch

from havoc_core import HavocError, precision
from havoc_core.precision import plan_inference, training_dtype


@pytest.fixture(params=[True, False], ids=["native-bf16", "avx2-only"])
def native_bf16(request, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_storage_dtype_follows_size_and_hardware(native_bf16):
    small, large = plan_inference(5_000_000, device="cpu"), plan_inference(2_000_000_000, device="cpu")
    assert small.weights == (torch.bfloat16 if native_bf16 else torch.float32)
    assert large.weights == torch.bfloat16  # decode reads half the bytes
    assert plan_inference(5_000_000, device="cpu", quantize="int8").weights == torch.float32  # fbgemm takes fp32
    assert plan_inference(5_000_000, device="cuda").weights == torch.bfloat16
    assert plan_inference(5_000_000, device="cpu", dtype="float16").weights == torch.float16


def test_prefill_runs_fp32_where_bf16_is_emulated(native_bf16):
    plan = plan_inference(2_000_000_000, device="cpu")
    assert plan.prefill == (torch.bfloat16 if native_bf16 else torch.float32)
    assert plan_inference(2_000_000_000, device="cuda").prefill == torch.bfloat16


def test_packing_when_batching_or_small_fp32(native_bf16):
    assert plan_inference(2_000_000_000, device="cpu", batching=True).pack
    assert not plan_inference(2_000_000_000, device="cpu").pack  # chat of a big model keeps one copy
    assert plan_inference(5_000_000, device="cpu", dtype="float32").pack
    assert not plan_inference(5_000_000, device="cpu", batching=True, pack=False).pack  # --no-prepack
    assert not plan_inference(5_000_000, device="cuda", batching=True).pack


def test_training_dtype_follows_the_hardware(native_bf16):
    cpu = torch.device("cpu")
    assert training_dtype("float32", cpu) == torch.float32 and training_dtype("bfloat16", cpu) == torch.bfloat16
    assert training_dtype("auto", cpu) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert training_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_the_plan_says_what_it_chose(native_bf16):
    line = plan_inference(5_000_000, device="cpu", quantize="int8", batching=True).describe()
    assert line == "cpu: weights int8 (fbgemm), prefill fp32, prepacked weights (oneDNN)"
    assert "weights bf16, prefill " + ("bf16" if native_bf16 else "fp32") in plan_inference(
        2_000_000_000, device="cpu").describe()


def test_bad_choices_are_one_line_errors():
    with pytest.raises(HavocError, match="dtype: expected auto or one of float32, bfloat16, float16, found 'fp8'"):
        plan_inference(1, dtype="fp8")
    with pytest.raises(HavocError, match="quantize: expected int8"):
        plan_inference(1, quantize="int3")  # type: ignore[arg-type]
