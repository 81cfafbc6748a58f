"""HAVOC inside lm-evaluation-harness: ``HavocLM`` against lm-eval's own ``hf`` model on the
``havoc export`` of the same checkpoint, on tasks built here from local files (offline), and
``havoc eval --tasks`` end to end, bad input included."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.tasks import TaskManager  # noqa: E402

from havoc_core import HavocModel, cli  # noqa: E402
from havoc_core.checkpoint import save_model  # noqa: E402
from havoc_core.docs_task import docs_items, docs_scores  # noqa: E402
from havoc_core.hf import export  # noqa: E402
from havoc_core.lm_eval_model import HavocLM  # noqa: E402

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_var, "1")


def _yaml(path, name, data, body):
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\nfewshot_split: test\n{body}")
    return path


@pytest.fixture(scope="module")
def tasks(topics, topic_choices, tmp_path_factory):
    """Three local tasks, one per request type, from the pydoc topics: multiple choice (which
    topic a passage opens), perplexity of whole passages (longer than the 96-token context, so
    rolling windows and truncation are exercised), and greedy continuation until a blank line."""
    d = tmp_path_factory.mktemp("tasks")
    topic_choices(d / "mc.jsonl", items=24, words=(5, 40), head=50)
    with open(d / "roll.jsonl", "w") as f:
        for t in topics[:6]:
            f.write(json.dumps({"text": t[:1500]}) + "\n")
    with open(d / "gen.jsonl", "w") as f:
        for t in topics[:10]:
            f.write(json.dumps({"prompt": t[:80], "answer": t[80:100]}) + "\n")
    mc = _yaml(d / "t_mc.yaml", "t_mc", d / "mc.jsonl",
               "output_type: multiple_choice\ndoc_to_text: \"{{passage}}\\nTopic:\"\ndoc_to_choice: \"{{choices}}\"\n"
               "target_delimiter: \" \"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    roll = _yaml(d / "t_roll.yaml", "t_roll", d / "roll.jsonl",
                 "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                 "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    gen = _yaml(d / "t_gen.yaml", "t_gen", d / "gen.jsonl",
                "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
                "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 24\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n")
    return {"dir": d, "mc": mc, "roll": roll, "gen": gen}


@pytest.fixture(scope="module")
def exported(tok, tiny_config, tmp_path_factory):
    """A tiny GQA checkpoint (96-token context) trained for 40 real steps on the pydoc topics,
    and its `havoc export` for transformers."""
    from pydoc_data.topics import topics

    torch.manual_seed(0)
    model = HavocModel(tiny_config(initializer_range=0.02))
    ids = torch.tensor([t for k in sorted(topics) for t in tok.encode(topics[k])][: 64 * 97]).view(64, 97)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = ids[(step * 8) % 64:][:8]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = tmp_path_factory.mktemp("lm_eval_model")
    ckpt = save_model(d / "ckpt", model.eval(), tokenizer=tok)
    return ckpt, export(ckpt, d / "hf")


def _evaluate(model, tasks, **kw):
    manager = TaskManager(include_path=str(tasks["dir"]), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=kw.pop("names", ["t_mc", "t_roll", "t_gen"]),
                                   task_manager=manager, log_samples=True, bootstrap_iters=0, **kw)


def _responses(out, task):
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template-fewshot"])
def test_scores_equal_lm_evals_hf_model_on_the_export(exported, tasks, chat):
    ckpt, hf_dir = exported
    kw = {"apply_chat_template": True, "fewshot_as_multiturn": True, "num_fewshot": 2, "names": ["t_mc", "t_gen"]} \
        if chat else {}
    ours = _evaluate(HavocLM(checkpoint=str(ckpt), dtype="float32", batch_size=6), tasks, **kw)
    theirs = _evaluate("hf", tasks, model_args=f"pretrained={hf_dir},dtype=float32", batch_size=6, device="cpu", **kw)
    for task in ours["results"]:
        a, b = _responses(ours, task), _responses(theirs, task)
        assert len(a) == len(b) > 0
        if task == "t_gen":  # greedy text, exactly
            assert a == b
            assert sum(len(r[0]) for r in a) > 0
            continue
        flat_a = [x for r in a for x in r]
        flat_b = [x for r in b for x in r]
        for x, y in zip(flat_a, flat_b, strict=True):  # rolling: [logprob]; choices: [(logprob, is_greedy)]
            lp_a, lp_b = (x[0], y[0]) if task == "t_roll" else (x[0][0], y[0][0])
            assert lp_a == pytest.approx(lp_b, abs=1e-4)
        if task == "t_mc":
            assert [x[0][1] for x in flat_a] == [x[0][1] for x in flat_b]  # is_greedy
            assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
            assert ours["results"][task]["acc_norm,none"] == theirs["results"][task]["acc_norm,none"]
        else:
            assert ours["results"][task]["bits_per_byte,none"] == pytest.approx(
                theirs["results"][task]["bits_per_byte,none"], rel=1e-5)


def test_local_completions_against_havoc_serve_equals_hf_on_the_export(exported, tasks, serving, tmp_path):
    """lm-eval's own API client (``local-completions``: token ids, echo, logprobs, max_tokens 1)
    scoring ``havoc serve`` gives the hf model's scores on the export of the same checkpoint. The
    passages are cut to 12 words: prompt and the one generated token must fit the 96-token context
    (the server refuses more, as vLLM does), where hf would left-truncate instead."""
    from havoc_core.inference import load_for_inference
    from havoc_core.serve import create_app

    ckpt, hf_dir = exported
    with open(tmp_path / "short.jsonl", "w") as f:
        for line in (tasks["dir"] / "mc.jsonl").read_text().splitlines():
            doc = json.loads(line)
            f.write(json.dumps({**doc, "passage": " ".join(doc["passage"].split()[:12])}) + "\n")
    body = tasks["mc"].read_text().split("fewshot_split: test\n", 1)[1]  # t_mc's prompt, choices, metrics
    _yaml(tmp_path / "short.yaml", "t_short", tmp_path / "short.jsonl", body)
    short = {"dir": tmp_path}
    model, tok = load_for_inference(ckpt, dtype=torch.float32)
    theirs = _evaluate("hf", short, model_args=f"pretrained={hf_dir},dtype=float32", batch_size=6, device="cpu",
                       names=["t_short"])
    with serving(create_app(model, tok, model_name="havoc")) as server:
        args = (f"model=havoc,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={hf_dir},max_length=95,num_concurrent=1,max_retries=1")
        served = _evaluate("local-completions", short, model_args=args, names=["t_short"])
    a, b = _responses(served, "t_short"), _responses(theirs, "t_short")
    assert len(a) == len(b) == 24
    for x, y in zip([x for r in a for x in r], [y for r in b for y in r], strict=True):
        assert x[0][0] == pytest.approx(y[0][0], abs=1e-4) and x[0][1] == y[0][1]  # logprob, is_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["t_short"][metric] == theirs["results"]["t_short"][metric]


def test_shared_context_scoring_equals_one_request_at_a_time(exported, tok):
    """The batched, context-shared path against a plain full forward pass per request."""
    ckpt, _ = exported
    lm = HavocLM(checkpoint=str(ckpt), dtype="float32", batch_size=5)
    rng = random.Random(1)
    reqs = []
    for _ in range(7):
        ctx = [rng.randrange(6, tok.vocab_size) for _ in range(rng.randrange(1, 80))]
        for _ in range(rng.randrange(1, 8)):  # groups larger than a batch are split
            reqs.append((("", ""), ctx, [rng.randrange(6, tok.vocab_size) for _ in range(rng.randrange(1, 30))]))
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (_, ctx, cont), (lp, greedy) in zip(reqs, got, strict=True):
        whole = (ctx + cont)[-97:]
        with torch.no_grad():
            logp = lm.model(torch.tensor([whole[:-1]]))[0].float().log_softmax(-1)[-len(cont):]
        assert lp == pytest.approx(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


def test_havoc_eval_tasks_prints_a_table_and_writes_the_results(exported, tasks, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / "results.json"
    assert cli.main(["eval", str(ckpt), "--tasks", f"havoc-docs,{tasks['mc']}", "--limit", "20",
                     "--output", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["config"]["max_seq_len"] == 96 and report["checkpoint"] == str(ckpt)
    docs = report["results"]["havoc-docs"]
    model = HavocModel.from_pretrained(ckpt).eval()
    from havoc_core.tokenizer import HavocTokenizer
    assert {k: docs[k] for k in ("acc", "acc_mutual_info")} == docs_scores(model, HavocTokenizer.load(ckpt),
                                                                           docs_items("test")[:20])
    assert docs["samples"] == 20 and report["results"]["t_mc"]["samples"] == 20
    for task, metric in [("havoc-docs", "acc_mutual_info"), ("t_mc", "acc_norm")]:
        line = next(ln for ln in table.splitlines() if ln.split()[:2] == [task, metric])
        assert float(line.split()[2]) == pytest.approx(report["results"][task][metric], abs=5e-5)


@pytest.mark.parametrize("case", ["unknown-task", "missing-field", "extra-field", "limit-0", "no-tokenizer",
                                  "offline-dataset"])
def test_bad_input_is_one_line_and_exit_2(exported, tasks, tmp_path, capsys, case):
    ckpt, _ = exported
    args = ["eval", str(ckpt), "--tasks", str(tasks["mc"])]
    if case == "unknown-task":
        args[3] = "no_such_task_xyz"
        expect = "unknown task 'no_such_task_xyz'"
    elif case == "missing-field":
        bad = tmp_path / "bad.yaml"
        bad.write_text(tasks["mc"].read_text().replace("doc_to_choice", "# doc_to_choice"))
        args[3], expect = str(bad), "doc_to_choice: missing"
    elif case == "extra-field":
        bad = tmp_path / "extra.yaml"
        bad.write_text(tasks["mc"].read_text() + "doc_to_choise: oops\n")
        args[3], expect = str(bad), "doc_to_choise: not a task field"
    elif case == "limit-0":
        args += ["--limit", "0"]
        expect = "--limit: expected a count >= 1"
    elif case == "no-tokenizer":
        save_model(tmp_path / "bare", HavocModel.from_pretrained(ckpt))
        args[1], expect = str(tmp_path / "bare"), "no tokenizer.json"
    else:
        hub = _yaml(tmp_path / "hub.yaml", "t_hub", "unused.jsonl", "output_type: loglikelihood\n"
                    "doc_to_text: x\ndoc_to_target: y\n")
        hub.write_text(hub.read_text().replace("dataset_path: json", "dataset_path: havoc-tests/not-cached"))
        args[3], expect = str(hub), "not available offline"
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err


def test_without_lm_eval_the_command_says_how_to_install_it(exported, monkeypatch, capsys):
    import sys

    ckpt, _ = exported
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an install without the eval extra sees
    assert cli.main(["eval", str(ckpt), "--tasks", "hellaswag"]) == 2
    assert "pip install 'havoc[eval]'" in capsys.readouterr().err
    assert cli.main(["eval", str(ckpt), "--tasks", "havoc-docs", "--limit", "4"]) == 0  # built in: still works
