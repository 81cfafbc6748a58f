"""Generation engine on a real BPE tokenizer (trained on pydoc topics) and a real, randomly
initialised tiny model: cached decoding against the plain forward pass, batching, sampling,
stop handling, UTF-8-safe streaming, the context limit, bf16/int8 weights."""

import copy

import pytest
import torch

from havoc_core import AttentionConfig, HavocConfig, HavocError, HavocModel, MLPConfig
from havoc_core.generate import (
    Engine,
    InferenceLinear,
    SamplingParams,
    TextStream,
    cpu_has_native_bf16,
    is_packed,
    prepare_model,
    sample_token,
)
from havoc_core.tokenizer import HavocTokenizer

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=24)
PROMPTS = ["def main():\n    ", "The import statement", "x", "Exceptions are raised when an error occurs in"]
ATOL = 1e-4  # fp32 logits: cached decoding vs one full forward pass


def topics_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="module")
def tok() -> HavocTokenizer:
    return HavocTokenizer.train(topics_text(), vocab_size=1024, show_progress=False)


@pytest.fixture(scope="module")
def model() -> HavocModel:
    """A large init scale gives peaked, varied next-token distributions (not one repeated token)."""
    torch.manual_seed(0)
    cfg = HavocConfig(vocab_size=1024, d_model=64, num_layers=2, max_seq_len=96, initializer_range=0.3,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2), mlp=MLPConfig(hidden_dim=128))
    return HavocModel(cfg).eval()


def naive_greedy(model: HavocModel, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward pass over the whole sequence for every token, no cache."""
    ids, out = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
        if t == model.config.eos_token_id or len(ids) >= model.config.max_seq_len:
            break
        out.append(t)
        ids.append(t)
    return out


def prompt_ids(tok: HavocTokenizer, text: str) -> list[int]:
    return [tok.bos_id, *tok.encode(text)]


# --------------------------------------------------------------------------- exactness

def test_cached_logits_equal_full_forward(model, tok):
    ids = prompt_ids(tok, "Exceptions are raised when an error occurs in the interpreter, and")
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
        cache = model.make_cache(1)
        split = 5
        parts = [model(torch.tensor([ids[:split]]), cache=cache, start=0)[0]]
        for p in range(split, len(ids)):
            parts.append(model(torch.tensor([[ids[p]]]), cache=cache, start=p)[0])
    torch.testing.assert_close(torch.cat(parts), full, atol=ATOL, rtol=0)


def test_per_row_positions_equal_full_forward(model, tok):
    """Rows at different cache positions decoded in one batch (the engine's slot layout)."""
    seqs = [prompt_ids(tok, t) for t in PROMPTS[:3]]
    with torch.no_grad():
        cache = model.make_cache(len(seqs))
        for i, s in enumerate(seqs):  # prefill all but the last token of each row into its own row
            model(torch.tensor([s[:-1]]), cache=[c.view(slice(i, i + 1), 96) for c in cache], start=0)
        start = torch.tensor([len(s) - 1 for s in seqs])
        length = int(start.max()) + 1
        mask = (torch.arange(length) <= start[:, None])[:, None, None, :]
        out = model(torch.tensor([[s[-1]] for s in seqs]), cache=[c.view(slice(0, 3), length) for c in cache],
                    start=start, mask=mask)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out[i, -1], model(torch.tensor([s]))[0, -1], atol=ATOL, rtol=0)


def test_greedy_with_cache_equals_without(model, tok):
    engine = Engine(model, tok)
    for text in PROMPTS:
        ids = prompt_ids(tok, text)
        got = engine.generate([ids], GREEDY)[0]
        assert got.ids == naive_greedy(model, ids, GREEDY.max_new_tokens)
        assert len(set(got.ids)) > 3  # the fixture model says something varied
        assert got.text == tok.decode(got.ids).replace("\ufffd", "")  # stray bytes are dropped, not shown


def test_prompt_alone_equals_prompt_in_batch(model, tok):
    prompts = [prompt_ids(tok, t) for t in PROMPTS * 2]
    alone = [Engine(model, tok).generate([p], GREEDY)[0] for p in prompts]
    batched = Engine(model, tok, max_batch=3).generate(prompts, GREEDY)  # 8 prompts, 3 slots: queueing
    assert [b.ids for b in batched] == [a.ids for a in alone]
    assert [b.prompt_tokens for b in batched] == [len(p) for p in prompts]


def test_slots_join_and_leave_between_steps(model, tok):
    """The server's use: a request joins while another runs; each equals its solo run."""
    a, b = prompt_ids(tok, PROMPTS[0]), prompt_ids(tok, PROMPTS[3])
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    engine = Engine(model, tok, max_batch=2)
    sa = engine.add(a, params)
    for _ in range(5):
        engine.step()
    sb = engine.add(b, params)
    while engine.active():
        engine.step()
    assert engine.result(sa).ids == naive_greedy(model, a, 12)
    assert engine.result(sb).ids == naive_greedy(model, b, 12)
    engine.remove(sa)
    assert engine.add(b, params) == sa  # the freed slot is reused


def test_scattered_slots_decode_only_running_rows(model, tok):
    """Running slots 0, 2 and 5 of 6 (idle ones between, with stale caches): the gathered decode
    path writes and reads each row's own cache and equals every request's solo run."""
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    prompts = [prompt_ids(tok, t) for t in PROMPTS[:3]]
    engine = Engine(model, tok, max_batch=6)
    for slot in range(6):  # fill every cache row with something else first
        engine.add(prompt_ids(tok, PROMPTS[3]), params, slot=slot)
    while engine.active():
        engine.step()
    for slot, p in zip((0, 2, 5), prompts, strict=True):
        engine.add(p, params, slot=slot)
        engine.step()  # staggered: different positions
    while engine.active():
        engine.step()
    for slot, p in zip((0, 2, 5), prompts, strict=True):
        assert engine.result(slot).ids == naive_greedy(model, p, 12)


def test_batched_prefill_equals_one_by_one(model, tok):
    """``add_batch`` over scattered slots with stale caches: rows of different lengths (right-padded
    in one pass), one extending a prefix its slot already holds; then a batch with a row so long that
    padding would pass the context (each row gets its own pass); then a batch split into passes by
    ``PREFILL_TOKENS``. Every request equals its solo run."""
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    engine = Engine(model, tok, max_batch=6)
    first = prompt_ids(tok, PROMPTS[1])
    for slot in range(6):
        engine.add(prompt_ids(tok, PROMPTS[3]) if slot != 2 else first, params, slot=slot)
    while engine.active():
        engine.step()
    extended = [*first, *tok.encode(" and more words here")]
    long = prompt_ids(tok, " ".join(["word"] * 200))[: model.config.max_seq_len - 3]
    batches = [{5: prompt_ids(tok, PROMPTS[2]), 0: prompt_ids(tok, PROMPTS[0]), 2: extended},  # not ascending
               {1: long, 2: [*extended, *tok.encode(" again")]},
               {3: prompt_ids(tok, PROMPTS[0]), 4: prompt_ids(tok, PROMPTS[1]), 0: prompt_ids(tok, PROMPTS[3])}]
    assert len(extended) + len(long) - 1 > model.config.max_seq_len  # slot 2's start + the padded width
    for n, prompts in enumerate(batches):
        if n == 2:  # passes of two rows at most: the batch is split
            engine.PREFILL_TOKENS = 2 * max(len(p) for p in prompts.values())
        assert engine.add_batch([(p, params, slot) for slot, p in prompts.items()]) == list(prompts)
        while engine.active():
            engine.step()
        for slot, p in prompts.items():
            assert engine.result(slot).ids == naive_greedy(model, p, 10), slot
    assert engine.slots[2].cached == len(extended) and engine.slots[1].cached == 1  # the shared bos


def test_add_batch_checks_everything_before_changing_anything(model, tok):
    engine = Engine(model, tok, max_batch=3)
    good = prompt_ids(tok, PROMPTS[0])
    with pytest.raises(HavocError, match="empty prompt"):
        engine.add_batch([(good, GREEDY, 0), ([], GREEDY, 1)])
    with pytest.raises(HavocError, match="slot 1: given twice"):
        engine.add_batch([(good, GREEDY, 1), (good, GREEDY, 1)])
    assert engine.slots == [None, None, None]


# --------------------------------------------------------------------------- sampling

def test_mixed_params_in_one_batch_equal_alone(model, tok):
    """Greedy, top-k, top-p and penalised seeded rows sampled together (one batched call) give
    each request's solo tokens."""
    p = prompt_ids(tok, PROMPTS[1])
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


def test_seed_reproducible_and_independent_of_batch(model, tok):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7, max_new_tokens=16)
    p = prompt_ids(tok, PROMPTS[1])
    alone = Engine(model, tok).generate([p], params)[0].ids
    assert Engine(model, tok).generate([p], params)[0].ids == alone
    batched = Engine(model, tok, max_batch=3).generate([prompt_ids(tok, PROMPTS[0]), p, p], params)
    assert batched[1].ids == alone and batched[2].ids == alone
    other = Engine(model, tok).generate([p], SamplingParams(temperature=1.0, seed=8, max_new_tokens=16))[0]
    assert other.ids != alone


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


def test_repetition_penalty_reduces_repeats(model, tok):
    p = prompt_ids(tok, "x")
    plain = Engine(model, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=40))[0].ids
    penalised = Engine(model, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=40,
                                                                repetition_penalty=3.0))[0].ids
    assert len(set(penalised)) / len(penalised) > len(set(plain)) / len(plain)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
                                         ("repetition_penalty", 0.0), ("stop", [""])])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(HavocError, match=field):
        SamplingParams(**{field: value}).validate()


# --------------------------------------------------------------------------- stopping and limits

def test_stop_token_and_stop_string(model, tok):
    p = prompt_ids(tok, PROMPTS[0])
    free = Engine(model, tok).generate([p], GREEDY)[0]
    cut = free.ids[4]
    by_id = Engine(model, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=24, stop_ids=[cut]))[0]
    assert by_id.ids == free.ids[: free.ids.index(cut)] and by_id.finish_reason == "stop"
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip()
    by_text = Engine(model, tok).generate([p], SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop]))[0]
    assert by_text.text == free.text[: free.text.index(stop)] and by_text.finish_reason == "stop"


def test_never_past_max_seq_len(model, tok):
    max_len = model.config.max_seq_len
    engine = Engine(model, tok)
    p = [tok.bos_id] + tok.encode(" ".join(topics_text()))[: max_len - 4]
    got = engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=50))[0]
    assert len(p) + len(got.ids) <= max_len and got.finish_reason in ("length", "stop")
    with pytest.raises(HavocError, match="max_seq_len"):
        engine.add(p + [5, 5, 5, 5])
    with pytest.raises(HavocError, match="empty"):
        engine.add([])


# --------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("text", ["emoji 😀👍🏽 family 👨‍👩‍👧 done", "中文字符和日本語のテキスト", "Ünïcödé café"])
def test_text_stream_only_whole_characters(tok, text):
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # characters really are split across tokens
    stream = TextStream(tok)
    deltas = [stream.push(t) for t in ids] + [stream.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert any(d == "" for d in deltas)  # some tokens were held back mid-character


def test_text_stream_holds_back_a_possible_stop_string(tok):
    ids = tok.encode("alpha beta ### gamma")
    stream = TextStream(tok, stop=["###"])
    deltas = [stream.push(t) for t in ids]
    assert "".join(deltas) == "alpha beta " and stream.stopped
    assert all("#" not in d for d in deltas)


def test_engine_stream_matches_generate_and_can_stop_early(model, tok):
    p = prompt_ids(tok, PROMPTS[3])
    engine = Engine(model, tok)
    full = engine.generate([p], GREEDY)[0]
    assert "".join(engine.stream(p, GREEDY, slot=0)) == full.text
    it = engine.stream(p, GREEDY, slot=0)
    next(it)
    it.close()  # the consumer left: the request ends, the slot and its cache stay
    assert engine.result(0).finish_reason == "abort" and not engine.active()


def test_prefix_reuse_prefills_only_new_tokens(model, tok):
    engine = Engine(model, tok)
    first = prompt_ids(tok, PROMPTS[0])
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
    assert engine.result(s).ids == naive_greedy(model, follow, GREEDY.max_new_tokens)


# --------------------------------------------------------------------------- weights for inference

@pytest.mark.parametrize("dtype,quantize,min_cos", [(torch.bfloat16, None, 0.995), (torch.float32, "int8", 0.95),
                                                     (torch.bfloat16, "int8", 0.95)])
def test_bf16_and_int8_weights_track_fp32(model, tok, dtype, quantize, min_cos):
    """Same tokens through both (teacher forcing): an fp32 prefill, then single-token decode steps
    in the stored dtype (int8: fbgemm's kernel). The int8 bound is loose because this random
    model's large weights amplify rounding; bench/decode.py reports the loss change of a trained one."""
    fast = prepare_model(copy.deepcopy(model), dtype, quantize)
    assert fast.embed.weight.dtype == dtype
    ids = prompt_ids(tok, PROMPTS[3])
    ids += naive_greedy(model, ids, 8)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
        cache = fast.make_cache(1)
        got = [fast(torch.tensor([ids[:5]]), cache=cache, compute_dtype=torch.float32)[0]]
        got += [fast(torch.tensor([[t]]), cache=cache, start=p)[0] for p, t in enumerate(ids[5:], start=5)]
    cos = torch.nn.functional.cosine_similarity(torch.cat(got).float(), ref, dim=-1)
    assert cos.min() > min_cos


def test_prepared_fp32_model_fuses_projections_and_matches(model, tok):
    """``prepare_model`` fuses q/k/v and gate/up into single matrices (one matmul, one rotation
    for q and k together): fp32 logits equal the plain model's and greedy decoding is unchanged."""
    fast = prepare_model(copy.deepcopy(model), torch.float32)
    assert fast.layers[0].attn.qkv_proj is not None and fast.layers[0].mlp.w13 is not None
    assert not hasattr(fast.layers[0].attn, "q_proj") and not hasattr(fast.layers[0].mlp, "w1")
    ids = torch.tensor([prompt_ids(tok, PROMPTS[3])])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), atol=ATOL, rtol=0)
    prompts = [prompt_ids(tok, t) for t in PROMPTS]
    assert [c.ids for c in Engine(fast, tok, max_batch=2).generate(prompts, GREEDY)] == \
        [c.ids for c in Engine(model, tok, max_batch=2).generate(prompts, GREEDY)]
    if torch.backends.mkldnn.is_available():  # the engine decoded with oneDNN-packed matrices
        assert fast.layers[0].attn.qkv_proj._onednn is not None and fast.lm_head._onednn is not None
    plain = prepare_model(copy.deepcopy(model), torch.float32)
    Engine(plain, tok, max_batch=2, pack=False)  # `havoc serve --no-prepack`: one copy of the weights
    assert not is_packed(plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_compute_the_same_product(dtype):
    """``InferenceLinear.pack``: the oneDNN-packed product equals ``F.linear`` on 1 and 8 rows,
    2-D and 3-D inputs, with a bias; bf16 single rows keep ATen's kernel (bit-identical)."""
    if dtype == torch.bfloat16 and not cpu_has_native_bf16():
        pytest.skip("bf16 weights are packed only on CPUs with native bf16")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this PyTorch build")
    torch.manual_seed(0)
    w, b = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    layer = InferenceLinear(w, b)
    layer.pack()
    assert layer._onednn is not None
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    for shape in [(1, 64), (8, 64), (2, 3, 64), (8, 1, 64)]:
        x = torch.randn(shape).to(dtype)
        got, want = layer(x), torch.nn.functional.linear(x, w, b)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
    if dtype == torch.bfloat16:  # same bf16 products and rounding: bit-identical, packed or not
        for shape in [(8, 64), (1, 1, 64)]:
            x = torch.randn(shape).to(dtype)
            assert torch.equal(layer(x), torch.nn.functional.linear(x, w, b))
    x = torch.randn(8, 64).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(2)  # edited in place: packed again
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, b), **tol)
    twin = copy.deepcopy(layer)  # copies leave the opaque layout out
    assert twin._onednn is None and layer._onednn is not None
    torch.testing.assert_close(twin(x), layer(x), **tol)
    layer.to(torch.float16)  # a dtype change drops the copy of the old weight
    assert layer._onednn is None
    torch.testing.assert_close(layer(x.half()), torch.nn.functional.linear(x.half(), layer.weight, layer.bias))
    quantized = InferenceLinear(w.float(), None, "int8")
    quantized.pack()
    assert quantized._onednn is None  # int8 matrices have their own (fbgemm) layout


@pytest.mark.slow
def test_compiled_decode_equals_eager(model, tok):
    """Also on a prepared model an eager engine has packed: the compiled step does not trace the
    packed product (Inductor cannot lower it)."""
    prompts = [prompt_ids(tok, t) for t in PROMPTS]
    eager = Engine(model, tok, max_batch=2).generate(prompts, GREEDY)
    compiled = Engine(model, tok, max_batch=2, compile=True).generate(prompts, GREEDY)
    assert [c.ids for c in compiled] == [e.ids for e in eager]
    fast = prepare_model(copy.deepcopy(model), torch.float32)
    assert [c.ids for c in Engine(fast, tok, max_batch=2).generate(prompts, GREEDY)] == [e.ids for e in eager]
    assert fast.lm_head._onednn is not None or not torch.backends.mkldnn.is_available()
    compiled = Engine(fast, tok, max_batch=2, compile=True).generate(prompts, GREEDY)
    assert [c.ids for c in compiled] == [e.ids for e in eager]
