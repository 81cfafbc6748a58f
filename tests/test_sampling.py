"""The sampler on logits whose preferences are known: filters, penalties, bad values."""

import pytest
import torch

from havoc_core import HavocError
from havoc_core.sampling import SamplingParams, sample_token


def test_sampling_filters():
    logits = torch.tensor([1.0, 5.0, 4.9, -2.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_k=1), gen) for _ in range(20)} == {1}
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.05), gen) for _ in range(20)} == {1}
    top2 = {sample_token(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0), gen) for _ in range(200)}
    assert top2 == {1, 2}
    seen = torch.tensor([False, True, False, False, False])
    assert sample_token(logits, SamplingParams(temperature=0.0, repetition_penalty=1.5), gen, seen) == 2
    negative = torch.tensor([-1.0, -1.1])  # a penalised negative logit moves further down
    assert sample_token(negative, SamplingParams(temperature=0.0, repetition_penalty=1.5), gen,
                        torch.tensor([True, False])) == 1


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
                                         ("repetition_penalty", 0.0), ("stop", [""])])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(HavocError, match=field):
        SamplingParams(**{field: value}).validate()
