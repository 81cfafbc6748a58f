"""The sampler on logits whose preferences are known: filters, penalties, bad values."""

import pytest
import torch

from havoc_core import HavocError
from havoc_core.sampling import SamplingParams, sample_token, sample_tokens


def test_greedy_takes_the_first_maximum_of_any_logits_tensor():
    """Greedy picks run in numpy: the first of equal maxima, as torch.argmax, also for logits that
    require grad (a user's own forward pass) or are bf16."""
    logits = torch.tensor([0.5, 3.0, -1.0, 3.0], requires_grad=True)
    assert sample_token(logits, SamplingParams(temperature=0.0)) == 1
    assert sample_tokens(torch.tensor([[1.0, 2.0, 2.0], [7.0, 7.0, 0.0]]).bfloat16(),
                         [SamplingParams(temperature=0.0)] * 2, [None, None], [None, None]) == [1, 0]


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


def test_openai_penalties_logit_bias_and_min_p():
    """OpenAI's definitions on logits whose preferences are known: logit - count * frequency -
    (count > 0) * presence, + logit_bias; min_p keeps tokens at least min_p times the top one."""
    logits = torch.tensor([1.0, 5.0, 4.0, -2.0, 0.0])
    greedy = SamplingParams(temperature=0.0)
    counts = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    assert sample_tokens(logits[None], [greedy], [None], [None], [counts]) == [1]  # no penalty set: ignored
    presence = SamplingParams(temperature=0.0, presence_penalty=1.5)  # 5 - 1.5 < 4
    assert sample_tokens(logits[None], [presence], [None], [None], [counts]) == [2]
    assert sample_tokens(logits[None], [SamplingParams(temperature=0.0, presence_penalty=0.9)], [None], [None],
                         [counts]) == [1]
    frequency = SamplingParams(temperature=0.0, frequency_penalty=0.6)  # twice: 5 - 1.2 < 4; once: 4.4 > 4
    assert sample_tokens(logits[None], [frequency], [None], [None], [counts * 2]) == [2]
    assert sample_tokens(logits[None], [frequency], [None], [None], [counts]) == [1]
    negative = SamplingParams(temperature=0.0, presence_penalty=-2.0)  # a negative penalty favours repeats
    assert sample_tokens(torch.tensor([[3.0, 4.0]]), [negative], [None], [None], [torch.tensor([1.0, 0.0])]) == [0]
    assert sample_token(logits, SamplingParams(temperature=0.0, logit_bias={4: 5.5})) == 4
    assert sample_token(logits, SamplingParams(temperature=0.0, logit_bias={1: -100})) == 2
    gen = torch.Generator().manual_seed(0)
    banned = SamplingParams(temperature=1.0, top_p=1.0, logit_bias={1: -100, 2: -100})
    assert 1 not in {sample_token(logits, banned, gen) for _ in range(200)}
    # p(2) / p(1) = e^-1 = 0.37: min_p 0.3 keeps both, 0.5 only the top one
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_p=1.0, min_p=0.3), gen) for _ in range(300)} \
        == {1, 2}
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_p=1.0, min_p=0.5), gen) for _ in range(100)} \
        == {1}


def test_n_samples_get_consecutive_seeds():
    assert [p.seed for p in SamplingParams(seed=7, n=3).samples()] == [7, 8, 9]
    assert all(p.n == 1 for p in SamplingParams(n=2).samples()) and len(SamplingParams(n=2).samples()) == 2


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
                                         ("repetition_penalty", 0.0), ("repetition_penalty", 3e-113),
                                         ("stop", [""]), ("presence_penalty", 2.5),
                                         ("frequency_penalty", -3), ("min_p", 1.5), ("n", 9), ("n", 0),
                                         ("logprobs", 21), ("logprobs", True), ("logit_bias", {3: 101}),
                                         ("logit_bias", {-1: 1.0}), ("logit_bias", {"a": 1.0})])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(HavocError, match=field):
        SamplingParams(**{field: value}).validate()


def test_repeated_ngram_bans_name_exactly_the_completing_ids():
    from havoc_core.sampling import repeated_ngram_bans

    reply = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2]
    assert repeated_ngram_bans(reply, 3) == {3}  # "1 2 3" was seen twice: only 3 completes it
    assert repeated_ngram_bans(reply, 4) == set()  # no earlier "x 1 2" ... "1 2" tail is only 2 long
    assert repeated_ngram_bans([*reply, 3], 4) == {9, 7}
    assert repeated_ngram_bans(reply, 1) == set(reply) and repeated_ngram_bans([5], 3) == set()


def test_a_vanishing_temperature_is_greedy_not_nan():
    """Found by the HTTP fuzz: dividing by temperature 1e-300 overflowed the logits to inf and the
    top-p cut indexed -1 (a 500). Below 1e-5 it is greedy, as in vLLM."""
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for t in (1e-300, 1e-6):
        params = SamplingParams(temperature=t, top_p=0.5, top_k=3).validate()
        assert sample_token(logits, params, torch.Generator().manual_seed(0)) == 1


def test_a_top_p_below_float32s_range_keeps_the_top_token():
    """Found by the HTTP fuzz: top_p 8e-182 is 0 in float32, the nucleus came out empty and the
    cut indexed -1 (a 500). The most likely token always stays."""
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    params = SamplingParams(temperature=1.0, top_p=8e-182).validate()
    assert sample_token(logits, params, torch.Generator().manual_seed(0)) == 1
