"""The engine on a real BPE tokenizer (trained on pydoc topics) and a real, randomly initialised tiny
model: cached decoding against the plain forward pass, batching, slots, prefill, stop handling,
the context limit, streaming and prefix reuse."""

import pytest

from havoc_core import HavocError
from havoc_core.engine import Engine
from havoc_core.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=24)
PROMPTS = ["def main():\n    ", "The import statement", "x", "Exceptions are raised when an error occurs in"]


def test_greedy_with_cache_equals_without(model, tok, reference_greedy, prompt_ids):
    engine = Engine(model, tok)
    for text in PROMPTS:
        ids = prompt_ids(text)
        got = engine.generate([ids], GREEDY)[0]
        assert got.ids == reference_greedy(model, ids, GREEDY.max_new_tokens)
        assert len(set(got.ids)) > 3  # the fixture model says something varied
        assert got.text == tok.decode(got.ids).replace("\ufffd", "")  # stray bytes are dropped, not shown


def test_prompt_alone_equals_prompt_in_batch(model, tok, prompt_ids):
    prompts = [prompt_ids(t) for t in PROMPTS * 2]
    alone = [Engine(model, tok).generate([p], GREEDY)[0] for p in prompts]
    batched = Engine(model, tok, max_batch=3).generate(prompts, GREEDY)  # 8 prompts, 3 slots: queueing
    assert [b.ids for b in batched] == [a.ids for a in alone]
    assert [b.prompt_tokens for b in batched] == [len(p) for p in prompts]


def test_slots_join_and_leave_between_steps(model, tok, reference_greedy, prompt_ids):
    """The server's use: a request joins while another runs; each equals its solo run."""
    a, b = prompt_ids(PROMPTS[0]), prompt_ids(PROMPTS[3])
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    engine = Engine(model, tok, max_batch=2)
    sa = engine.add(a, params)
    for _ in range(5):
        engine.step()
    sb = engine.add(b, params)
    while engine.active():
        engine.step()
    assert engine.result(sa).ids == reference_greedy(model, a, 12)
    assert engine.result(sb).ids == reference_greedy(model, b, 12)
    engine.remove(sa)
    assert engine.add(b, params) == sa  # the freed slot is reused


def test_scattered_slots_decode_only_running_rows(model, tok, reference_greedy, prompt_ids):
    """Running slots 0, 2 and 5 of 6 (idle ones between, with stale caches): the gathered decode
    path writes and reads each row's own cache and equals every request's solo run."""
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    prompts = [prompt_ids(t) for t in PROMPTS[:3]]
    engine = Engine(model, tok, max_batch=6)
    for slot in range(6):  # fill every cache row with something else first
        engine.add(prompt_ids(PROMPTS[3]), params, slot=slot)
    while engine.active():
        engine.step()
    for slot, p in zip((0, 2, 5), prompts, strict=True):
        engine.add(p, params, slot=slot)
        engine.step()  # staggered: different positions
    while engine.active():
        engine.step()
    for slot, p in zip((0, 2, 5), prompts, strict=True):
        assert engine.result(slot).ids == reference_greedy(model, p, 12)


def test_batched_prefill_equals_one_by_one(model, tok, reference_greedy, prompt_ids):
    """``add_batch`` over scattered slots with stale caches: rows of different lengths (right-padded
    in one pass), one extending a prefix its slot already holds; then a batch with a row so long that
    padding would pass the context (each row gets its own pass); then a batch split into passes by
    ``PREFILL_TOKENS``. Every request equals its solo run."""
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    engine = Engine(model, tok, max_batch=6)
    first = prompt_ids(PROMPTS[1])
    for slot in range(6):
        engine.add(prompt_ids(PROMPTS[3]) if slot != 2 else first, params, slot=slot)
    while engine.active():
        engine.step()
    extended = [*first, *tok.encode(" and more words here")]
    long = prompt_ids(" ".join(["word"] * 200))[: model.config.max_seq_len - 3]
    batches = [{5: prompt_ids(PROMPTS[2]), 0: prompt_ids(PROMPTS[0]), 2: extended},  # not ascending
               {1: long, 2: [*extended, *tok.encode(" again")]},
               {3: prompt_ids(PROMPTS[0]), 4: prompt_ids(PROMPTS[1]), 0: prompt_ids(PROMPTS[3])}]
    assert len(extended) + len(long) - 1 > model.config.max_seq_len  # slot 2's start + the padded width
    for n, prompts in enumerate(batches):
        if n == 2:  # passes of two rows at most: the batch is split
            engine.PREFILL_TOKENS = 2 * max(len(p) for p in prompts.values())
        assert engine.add_batch([(p, params, slot) for slot, p in prompts.items()]) == list(prompts)
        while engine.active():
            engine.step()
        for slot, p in prompts.items():
            assert engine.result(slot).ids == reference_greedy(model, p, 10), slot
    assert engine.slots[2].cached == len(extended) and engine.slots[1].cached == 1  # the shared bos


def test_add_batch_checks_everything_before_changing_anything(model, tok, prompt_ids):
    engine = Engine(model, tok, max_batch=3)
    good = prompt_ids(PROMPTS[0])
    with pytest.raises(HavocError, match="empty prompt"):
        engine.add_batch([(good, GREEDY, 0), ([], GREEDY, 1)])
    with pytest.raises(HavocError, match="slot 1: given twice"):
        engine.add_batch([(good, GREEDY, 1), (good, GREEDY, 1)])
    assert engine.slots == [None, None, None]


def test_mixed_params_in_one_batch_equal_alone(model, tok, prompt_ids):
    """Greedy, top-k, top-p and penalised seeded rows sampled together (one batched call) give
    each request's solo tokens."""
    p = prompt_ids(PROMPTS[1])
    variants = [SamplingParams(temperature=0.0, max_new_tokens=16),
                SamplingParams(temperature=1.0, top_k=20, top_p=1.0, seed=3, max_new_tokens=16),
                SamplingParams(temperature=0.8, top_p=0.9, seed=4, max_new_tokens=16),
                SamplingParams(temperature=1.2, top_k=5, top_p=0.5, repetition_penalty=1.3, seed=5,
                               max_new_tokens=16)]
    alone = [Engine(model, tok).generate([p], v)[0].ids for v in variants]
    engine = Engine(model, tok, max_batch=4)
    slots = [engine.add(p, v) for v in variants]
    while engine.active():
        engine.step()
    assert [engine.result(s).ids for s in slots] == alone


def test_seed_reproducible_and_independent_of_batch(model, tok, prompt_ids):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7, max_new_tokens=16)
    p = prompt_ids(PROMPTS[1])
    alone = Engine(model, tok).generate([p], params)[0].ids
    assert Engine(model, tok).generate([p], params)[0].ids == alone
    batched = Engine(model, tok, max_batch=3).generate([prompt_ids(PROMPTS[0]), p, p], params)
    assert batched[1].ids == alone and batched[2].ids == alone
    other = Engine(model, tok).generate([p], SamplingParams(temperature=1.0, seed=8, max_new_tokens=16))[0]
    assert other.ids != alone


def test_repetition_penalty_reduces_repeats(model, tok, prompt_ids):
    p = prompt_ids("x")
    plain = Engine(model, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=40))[0].ids
    penalised = Engine(model, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=40,
                                                                repetition_penalty=3.0))[0].ids
    assert len(set(penalised)) / len(penalised) > len(set(plain)) / len(plain)


def test_stop_token_and_stop_string(model, tok, prompt_ids):
    p = prompt_ids(PROMPTS[0])
    free = Engine(model, tok).generate([p], GREEDY)[0]
    cut = free.ids[4]
    by_id = Engine(model, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=24, stop_ids=[cut]))[0]
    assert by_id.ids == free.ids[: free.ids.index(cut)] and by_id.finish_reason == "stop"
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip()
    by_text = Engine(model, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop]))[0]
    assert by_text.text == free.text[: free.text.index(stop)] and by_text.finish_reason == "stop"


def test_never_past_max_seq_len(model, tok, topics):
    max_len = model.config.max_seq_len
    engine = Engine(model, tok)
    p = [tok.bos_id] + tok.encode(" ".join(topics))[: max_len - 4]
    got = engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=50))[0]
    assert len(p) + len(got.ids) <= max_len and got.finish_reason in ("length", "stop")
    with pytest.raises(HavocError, match="max_seq_len"):
        engine.add(p + [5, 5, 5, 5])
    with pytest.raises(HavocError, match="empty"):
        engine.add([])


def test_engine_stream_matches_generate_and_can_stop_early(model, tok, prompt_ids):
    p = prompt_ids(PROMPTS[3])
    engine = Engine(model, tok)
    full = engine.generate([p], GREEDY)[0]
    assert "".join(engine.stream(p, GREEDY, slot=0)) == full.text
    it = engine.stream(p, GREEDY, slot=0)
    next(it)
    it.close()  # the consumer left: the request ends, the slot and its cache stay
    assert engine.result(0).finish_reason == "abort" and not engine.active()


def test_prefix_reuse_prefills_only_new_tokens(model, tok, reference_greedy, prompt_ids):
    engine = Engine(model, tok)
    first = prompt_ids(PROMPTS[0])
    s = engine.add(first, GREEDY)
    assert engine.slots[s].cached == 0  # all of it prefilled
    while engine.active():
        engine.step()
    reply = engine.result(s).ids
    follow = first + reply + [tok.eos_id, tok.role_id("user"), *tok.encode("and then?")]
    engine.add(follow, GREEDY, slot=s)
    assert engine.slots[s].cached == len(first) + len(reply) - 1  # the last reply token was never fed
    while engine.active():
        engine.step()
    assert engine.result(s).ids == reference_greedy(model, follow, GREEDY.max_new_tokens)


# --------------------------------------------------------------------------- logprobs, n, penalties

def test_logprobs_are_the_models_own_log_softmax(model, tok, prompt_ids):
    """Generated and prompt logprobs equal log-softmax in fp32 of the model's own full forward pass."""
    import torch

    ids = prompt_ids(PROMPTS[3])
    got = Engine(model, tok).generate([ids], SamplingParams(temperature=0, max_new_tokens=10, logprobs=5))[0]
    assert got.logprobs is not None and [lp.token for lp in got.logprobs] == got.ids
    with torch.no_grad():
        ref = model(torch.tensor([ids + got.ids]))[0].float().log_softmax(-1)
    for i, lp in enumerate(got.logprobs):
        row = ref[len(ids) - 1 + i]
        assert lp.logprob == pytest.approx(float(row[lp.token]), abs=1e-5)
        assert [t for t, _ in lp.top] == row.topk(5).indices.tolist()
        assert lp.top[0][0] == lp.token  # greedy picks the top one
    scored = Engine(model, tok).score(ids + got.ids, top=3)
    assert scored[0] is None and len(scored) == len(ids) + len(got.ids)
    for i, s in enumerate(scored[1:], start=1):
        assert s.token == (ids + got.ids)[i]
        assert s.logprob == pytest.approx(float(ref[i - 1, s.token]), abs=1e-5) and len(s.top) == 3
    plain = Engine(model, tok).generate([ids], SamplingParams(temperature=0, max_new_tokens=10))[0]
    assert plain.logprobs is None and plain.ids == got.ids


def test_n_samples_share_one_prefill_and_equal_their_seeds(model, tok, prompt_ids):
    ids = prompt_ids(PROMPTS[1])
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=40, n=3)
    engine = Engine(model, tok, max_batch=4)
    rows = []  # (batch, tokens) of every forward pass
    hook = model.register_forward_pre_hook(lambda _m, args: rows.append(tuple(args[0].shape)))
    try:
        many = engine.generate([ids], params)
    finally:
        hook.remove()
    assert rows[0] == (1, len(ids)) and all(r == (3, 1) for r in rows[1:])  # one prefilled row, 3 decoded
    single = [Engine(model, tok).generate([ids], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8,
                                                                seed=40 + j))[0].ids for j in range(3)]
    assert [c.ids for c in many] == single and len({tuple(s) for s in single}) > 1


def test_logit_bias_outside_the_vocabulary_is_refused(model, tok, prompt_ids):
    with pytest.raises(HavocError, match="logit_bias: token ids must be below the vocabulary size 1024"):
        Engine(model, tok).add(prompt_ids("x"), SamplingParams(logit_bias={5000: 1.0}))


def test_frequency_penalty_stops_a_greedy_loop(model, tok, prompt_ids):
    ids = prompt_ids(PROMPTS[2])
    plain = Engine(model, tok).generate([ids], SamplingParams(temperature=0, max_new_tokens=40))[0].ids
    penalised = Engine(model, tok).generate([ids], SamplingParams(temperature=0, max_new_tokens=40,
                                                                  presence_penalty=2.0, frequency_penalty=2.0))[0].ids
    assert len(set(penalised)) > len(set(plain))


def repeats(ids: list[int], n: int) -> bool:
    spans = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(spans) != len(set(spans))


def test_no_repeat_ngram_breaks_greedy_loops_and_changes_nothing_else(tiny_model, tok, prompt_ids):
    model = tiny_model(initializer_range=0.02, max_seq_len=160)  # a small init: flat logits, greedy loops
    long = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=80, ignore_eos=True)
    looping = [p for p in PROMPTS if repeats(Engine(model, tok).generate([prompt_ids(p)], long)[0].ids, 8)]
    assert looping, "the fixture model no longer loops under greedy decoding: pick a test that can fail"
    ban = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=80, ignore_eos=True, no_repeat_ngram_size=8)
    for text in looping:
        plain = Engine(model, tok).generate([prompt_ids(text)], long)[0].ids
        banned = Engine(model, tok, max_batch=2).generate([prompt_ids(text), prompt_ids(PROMPTS[0])], ban)[0].ids
        assert not repeats(banned, 8) and len(banned) == 80
        first = next(i for i in range(8, 81) if repeats(plain[:i], 8))  # where greedy first repeats a span
        assert banned[:first - 1] == plain[:first - 1] and banned[first - 1] != plain[first - 1]
