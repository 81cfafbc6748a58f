"""The KV cache: cached forward passes (rows at one position, rows at different positions) give the
logits of one full forward pass, on a real tokenizer and a real, randomly initialised tiny model."""

import copy

import pytest
import torch

from havoc_core import HavocError

PROMPTS = ["def main():\n    ", "The import statement", "x"]
ATOL = 1e-4  # fp32 logits: cached decoding vs one full forward pass


def test_cached_logits_equal_full_forward(model, tok, prompt_ids):
    ids = prompt_ids("Exceptions are raised when an error occurs in the interpreter, and")
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
        cache = model.make_cache(1)
        split = 5
        parts = [model(torch.tensor([ids[:split]]), cache=cache.view([0], [0]))[0]]
        parts.append(model(torch.tensor([ids[split:split + 3]]), cache=cache.view([0], [split]))[0])  # several new
        for p in range(split + 3, len(ids)):
            parts.append(model(torch.tensor([[ids[p]]]), cache=cache.view([0], [p]))[0])
    torch.testing.assert_close(torch.cat(parts), full, atol=ATOL, rtol=0)


def test_per_row_positions_equal_full_forward(model, tok, prompt_ids):
    """Rows at different cache positions decoded in one batch (the engine's slot layout)."""
    seqs = [prompt_ids(t) for t in PROMPTS[:3]]
    with torch.no_grad():
        cache = model.make_cache(len(seqs))
        for i, s in enumerate(seqs):  # prefill all but the last token of each row into its own row
            model(torch.tensor([s[:-1]]), cache=cache.view([i], [0]))
        starts = [len(s) - 1 for s in seqs]
        out = model(torch.tensor([[s[-1]] for s in seqs]), cache=cache.view([0, 1, 2], starts))
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out[i, -1], model(torch.tensor([s]))[0, -1], atol=ATOL, rtol=0)


def test_scattered_rows_at_different_positions_equal_full_forward(model, tok, prompt_ids):
    """Rows 0 and 2 of 3 (row 1 holds something else): the gathered path writes and reads each
    row's own keys/values."""
    seqs = [prompt_ids(t) for t in PROMPTS[:3]]
    with torch.no_grad():
        cache = model.make_cache(3)
        for i, s in enumerate(seqs):
            model(torch.tensor([s[:-1]]), cache=cache.view([i], [0]))
        picked = [seqs[0], seqs[2]]
        out = model(torch.tensor([[s[-1]] for s in picked]), cache=cache.view([0, 2], [len(s) - 1 for s in picked]))
        for i, s in enumerate(picked):
            torch.testing.assert_close(out[i, -1], model(torch.tensor([s]))[0, -1], atol=ATOL, rtol=0)


def test_a_pass_past_the_cache_is_refused(model, tok):
    cache = model.make_cache(1, max_len=8)
    with pytest.raises(HavocError, match="exceeds the cache's 8 positions"):
        model(torch.tensor([[1] * 9]), cache=cache.view([0], [0]))


def test_fp32_cache_gives_a_bf16_model_the_same_logits(model, tok, prompt_ids):
    """A one-slot engine on CPU keeps a bf16 model's keys and values in fp32 (``Engine``):
    attention on CPU computes in fp32 anyway, so the logits are the same bits as with a bf16 cache,
    over a prefill, a cached prefill and single steps."""
    from havoc_core.inference import prepare_model

    bf16 = prepare_model(copy.deepcopy(model), torch.bfloat16)
    ids = prompt_ids("Exceptions are raised when an error occurs in the interpreter, and")
    logits = {}
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            cache = bf16.make_cache(1, dtype=dtype)
            parts = [bf16(torch.tensor([ids[:5]]), cache=cache.view([0], [0]))[0],
                     bf16(torch.tensor([ids[5:8]]), cache=cache.view([0], [5]))[0]]
            parts += [bf16(torch.tensor([[ids[p]]]), cache=cache.view([0], [p]))[0] for p in range(8, len(ids))]
            logits[dtype] = torch.cat(parts)
    assert logits[torch.bfloat16].dtype == torch.bfloat16
    assert torch.equal(logits[torch.float32], logits[torch.bfloat16])
