"""The built-in havoc-docs task: a stable held-out split that the SFT conversations never mention."""

import hashlib

import pytest

from havoc_core.builtin_corpus import builtin_conversations, builtin_entries, held_out
from havoc_core.docs_task import NUM_CHOICES, docs_items, first_sentence, item_requests
from havoc_core.tokenizer import render_chat


def test_held_out_rule_is_the_documented_hash():
    names = ["json.dumps", "os.path.join", "collections.OrderedDict.move_to_end"]
    for name in names:
        assert held_out(name) == (int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0)


def test_items_are_held_out_of_the_conversations_and_well_formed():
    test, train = docs_items("test"), docs_items("train")
    assert len(test) > 300 and len(train) > 8 * len(test)
    assert {i.name for i in test}.isdisjoint(i.name for i in train)
    said = "\n".join(m["content"] for c in builtin_conversations() for m in c["messages"])
    assert not [i.name for i in test if f"`{i.name}`" in said or f"`{i.name}(" in said]
    docs = {e.name: e for e in builtin_entries()}
    for item in test:
        assert held_out(item.name) and len(item.choices) == NUM_CHOICES == len(set(item.choices))
        assert item.choices[item.gold] == "\n\n" + first_sentence(docs[item.name].doc)
    golds = [i.gold for i in test]
    assert all(golds.count(g) > len(test) // 6 for g in range(NUM_CHOICES))  # no position bias to exploit
    assert docs_items("test") == test  # deterministic


def test_requests_split_one_encoding_of_prefix_and_choice(tok):
    item = docs_items("test")[0]
    context, _ = render_chat(tok, [{"role": "user", "content": item.question}], add_generation_prompt=True)
    for (ctx, cont), choice in zip(item_requests(tok, item), item.choices, strict=True):
        assert ctx[:len(context)] == context and cont
        assert ctx[len(context):] + cont == tok.encode(item.answer_prefix + choice)


def test_scores_of_a_padded_batch_equal_one_request_at_a_time(tok, tiny_model):
    import torch

    from havoc_core.docs_task import _loglikelihoods, docs_scores, neutral

    model = tiny_model(max_seq_len=256)
    items = docs_items("test")[:3]
    pairs = [p for item in items for p in item_requests(tok, item) + item_requests(tok, neutral(item))]
    alone = [_loglikelihoods(model, tok, [p])[0] for p in pairs]
    assert _loglikelihoods(model, tok, pairs) == pytest.approx(alone, abs=1e-4)
    with torch.no_grad():  # and one of them by hand: the continuation's log-probabilities, summed
        c, x = pairs[0]
        logp = model(torch.tensor([c + x]))[0].float().log_softmax(-1)
        assert alone[0] == pytest.approx(sum(logp[len(c) - 1 + i, t].item() for i, t in enumerate(x)), abs=1e-4)
    scores = docs_scores(model, tok, items, batch_items=2)
    assert set(scores) == {"acc", "acc_mutual_info"} and all(v in (0, 1 / 3, 2 / 3, 1) for v in scores.values())
