"""Fixtures shared by the test modules: a real BPE tokenizer trained on real text (Python's pydoc
topics), tiny models built from real configs, a model whose replies never stop early, and a real
uvicorn server on a free loopback port."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def topics() -> list[str]:
    """The pydoc topics, in a fixed order: real documentation text that ships with Python."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def topic_choices(topics) -> Callable[..., Path]:
    """``topic_choices(path, items, words, head)``: a 4-choice task as JSONL (``passage``,
    ``choices``, ``gold``): which topic a passage (its words ``words[0]:words[1]``) opens, the
    right topic's first line (``head`` characters) among three others. Seeded."""

    def write(path: Path, items: int, words: tuple[int, int], head: int) -> Path:
        rng = random.Random(0)
        heads = [t.split("\n")[0][:head] for t in topics]
        with open(path, "w") as f:
            for i, t in enumerate(topics[:items]):
                choices = rng.sample([h for j, h in enumerate(heads) if j != i], 3)
                gold = rng.randrange(4)
                choices.insert(gold, heads[i])
                passage = " ".join(t.split()[words[0]:words[1]])
                f.write(json.dumps({"passage": passage, "choices": choices, "gold": gold}) + "\n")
        return path

    return write


@pytest.fixture(scope="session")
def tok(topics):
    """A 1,024-token byte-level BPE tokenizer trained on the pydoc topics."""
    from havoc_core.tokenizer import HavocTokenizer

    return HavocTokenizer.train(topics, vocab_size=1024, show_progress=False)


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Any]:
    """``tiny_config(**changes)``: a 2-layer, 64-wide GQA config for the 1,024-token tokenizer. The
    large init scale gives peaked, varied next-token distributions (not one repeated token)."""
    from havoc_core import AttentionConfig, HavocConfig, MLPConfig

    def make(**changes: Any) -> HavocConfig:
        base: dict[str, Any] = dict(vocab_size=1024, d_model=64, num_layers=2, max_seq_len=96, initializer_range=0.3,
                                    attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                                    mlp=MLPConfig(hidden_dim=128))
        return HavocConfig(**{**base, **changes})

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> Callable[..., Any]:
    """``tiny_model(**config_changes)``: a randomly initialised model (seed 0) in eval mode."""
    from havoc_core import HavocModel

    def make(**changes: Any) -> HavocModel:
        torch.manual_seed(0)
        return HavocModel(tiny_config(**changes)).eval()

    return make


@pytest.fixture(scope="session")
def endless_checkpoint(tok, tiny_config, tmp_path_factory) -> Path:
    """A checkpoint whose model never emits <|eos|> or a role token, so every request runs to exactly
    its token limit and counts can be checked exactly, while the other tokens still depend on the
    context: residual channel 0 carries a constant 3 that no block writes to, and only the output
    head's special-token rows read it, with a large negative weight. Context 256, untied head."""
    from havoc_core import HavocModel
    from havoc_core.checkpoint import save_model
    from havoc_core.tokenizer import SPECIAL_TOKENS

    torch.manual_seed(0)
    model = HavocModel(tiny_config(max_seq_len=256, tie_word_embeddings=False))
    n = len(SPECIAL_TOKENS)
    with torch.no_grad():
        model.embed.weight[:, 0] = 3.0
        for layer in model.layers:
            layer.attn.o_proj.weight[0] = 0.0
            layer.mlp.w2.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[:n] = 0.0
        model.lm_head.weight[:n, 0] = -100.0
    return save_model(tmp_path_factory.mktemp("endless") / "ckpt", model, tokenizer=tok)


class Server:
    """A real uvicorn server for ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from havoc_core.serve import listen

        self.sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def serving() -> type[Server]:
    """``with serving(app) as server:`` runs ``app`` on a free loopback port (``server.url``)."""
    return Server


@pytest.fixture(scope="module")
def model(tiny_model):
    """The tiny model with a 96-token context (module-scoped: tests may prepare copies of it)."""
    return tiny_model()


def naive_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward pass over the whole sequence for every token, no cache:
    the reference every cached decoding path is checked against."""
    ids, out = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
        if t == model.config.eos_token_id or len(ids) >= model.config.max_seq_len:
            break
        out.append(t)
        ids.append(t)
    return out


@pytest.fixture(scope="session")
def reference_greedy() -> Callable[..., list[int]]:
    """``reference_greedy(model, ids, n)``: see ``naive_greedy``."""
    return naive_greedy


@pytest.fixture(scope="session")
def prompt_ids(tok) -> Callable[[str], list[int]]:
    """``prompt_ids(text)``: ``<|bos|>`` + the text's ids, a raw (non-chat) prompt."""
    return lambda text: [tok.bos_id, *tok.encode(text)]
