"""``havoc <command>``: argument parsing only; the work lives in the modules.

Every ``HavocError`` becomes one ``error: ...`` line on stderr and exit status 2. It is long because
every command's flags and their help live here, one block per command, and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from havoc_core import integrity
from havoc_core.builtin_corpus import builtin_conversations, builtin_documents
from havoc_core.chat import CHAT_DEFAULTS, GENERATE_DEFAULTS, SMOKE_DEFAULTS, run_chat, run_generate, run_smoke
from havoc_core.checkpoint import (
    CHAT_RUN,
    RUN_DIRS,
    WEIGHTS_FILE,
    config_from_source,
    find_checkpoint,
    load_weights,
    save_model,
)
from havoc_core.config import format_params
from havoc_core.data import prepare_conversations
from havoc_core.demo import DemoPlan, run_demo
from havoc_core.errors import HavocError
from havoc_core.eval_tasks import TaskRun, format_table, run_tasks, task_list, write_report
from havoc_core.evaluate import evaluate_checkpoint
from havoc_core.gguf_export import OUTTYPES, export_gguf
from havoc_core.hf import export, import_hf
from havoc_core.inference import quantize_checkpoint
from havoc_core.metrics import plot_run
from havoc_core.model import HavocModel
from havoc_core.prepare import default_workers, prepare_pretrain
from havoc_core.sampling import SamplingParams
from havoc_core.sources import hf_documents, read_documents, report_skipped
from havoc_core.tokenizer import TOKENIZER_FILE, HavocTokenizer
from havoc_core.train import run_training
from havoc_core.train_config import TrainConfig

Handler = Callable[[argparse.Namespace], int | None]


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def _print_tree(data: dict[str, Any], indent: int = 0) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{' ' * indent}{key}:")
            _print_tree(value, indent + 2)
        else:
            print(f"{' ' * indent}{key}: {value}")


# --------------------------------------------------------------------------- commands

def cmd_inspect(args: argparse.Namespace) -> None:
    cfg = config_from_source(args.source)
    _print_tree(cfg.to_dict())
    if args.check_weights:
        load_weights(find_checkpoint(args.source), cfg, shapes_only=True)
        print("weights: every name and shape matches config.json")
    if args.verify:
        ckpt = find_checkpoint(args.source)
        problems = integrity.report(ckpt)
        for line in problems[1:]:
            print(f"error: {line}", file=sys.stderr)
        if problems:
            raise HavocError(problems[0])
        print(f"verified: every file listed in {ckpt / integrity.MANIFEST_FILE} matches its content hash")
    n = cfg.num_parameters()
    print(f"Model parameters: {format_params(n)} ({n:,})")


def cmd_quantize(args: argparse.Namespace) -> None:
    out = quantize_checkpoint(args.checkpoint, args.out, args.quantize)
    size = (out / WEIGHTS_FILE).stat().st_size
    print(f"wrote {out} ({args.quantize}, {size / 2**20:,.1f} MiB of weights)")


def cmd_init(args: argparse.Namespace) -> None:
    cfg = config_from_source(args.preset)
    torch.manual_seed(args.seed)
    model = HavocModel(cfg)
    tokenizer = None
    if args.tokenizer:
        tokenizer = HavocTokenizer.load(args.tokenizer)
        tokenizer.check_compatible(cfg)
    out = save_model(args.out, model, tokenizer=tokenizer)
    print(f"wrote {out} ({format_params(model.num_parameters())} parameters, random init)")


def _train_config(args: argparse.Namespace, phase: str) -> Any:
    """TrainConfig from --config (TOML/JSON) and the flags given, the flags winning."""


    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    given["phase"] = phase
    if phase == "sft" and "init" not in given and not args.config:
        given["init"] = RUN_DIRS["pretrain"]
    if args.config:
        return TrainConfig.load(args.config, overrides=given)
    return TrainConfig.from_settings(given, where="flags: ")


def cmd_train(args: argparse.Namespace) -> int:
    last = run_training(_train_config(args, args.command), resume=args.resume)
    print(json.dumps(last))
    return 130 if last.get("interrupted") else 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(DemoPlan(minutes=args.minutes))


def cmd_eval(args: argparse.Namespace) -> None:
    if args.tasks:
        run = TaskRun(task_list(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit,
                      batch_size=args.batch_size, include_path=args.include_path,
                      apply_chat_template=args.apply_chat_template, dtype=args.dtype)
        report = run_tasks(args.checkpoint, run)
        print(format_table(report))
        if args.output:
            print(f"wrote {write_report(report, args.output)}")
        return
    if not args.data:
        raise HavocError("eval: expected --data (loss, perplexity, bits per byte) or --tasks (benchmark scores)")
    result = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size,
                                 max_batches=args.max_batches)
    print(f"val loss {result['val_loss']:.4f} | perplexity {result['perplexity']:.2f} | "
          f"bits per byte {result['bits_per_byte']:.4f} | {result['tokens']:,} tokens")


def cmd_plot(args: argparse.Namespace) -> None:
    print(f"wrote {plot_run(args.run)}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "gguf":
        out = export_gguf(args.checkpoint, args.out, args.outtype or "f32", force=args.force, tokenizer=args.tokenizer)
        print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB, {args.outtype or 'f32'}) and "
              f"{out.with_suffix('.Modelfile')} (ollama); run it: llama-cli -m {out} (docs/GGUF.md)")
        return
    if args.outtype or args.force:
        raise HavocError(f"{'--outtype' if args.outtype else '--force'}: only with --format gguf "
                         "(the Hugging Face export keeps the checkpoint's dtype and replaces OUT)")
    print(f"wrote {export(args.checkpoint, args.out, tokenizer=args.tokenizer)} (Hugging Face Llama layout)")


def cmd_import(args: argparse.Namespace) -> None:
    print(f"wrote {import_hf(args.hf_dir, args.out_dir)} (HAVOC checkpoint)")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    skipped: list[str] = []
    docs = (list(read_documents(args.files, skip_invalid=args.skip_invalid, skipped=skipped))
            if args.files else builtin_documents())
    report_skipped(skipped, "inputs")
    tok = HavocTokenizer.train(docs, vocab_size=args.vocab_size)
    tok.save(args.out)
    reserved = f", {tok.num_reserved:,} of them reserved (the text had no more merges)" if tok.num_reserved else ""
    print(f"wrote {Path(args.out) / TOKENIZER_FILE}: {tok.vocab_size:,} tokens, {len(docs):,} documents{reserved}")


def cmd_prepare(args: argparse.Namespace) -> None:
    tok = HavocTokenizer.load(args.tokenizer)
    if args.sft:
        if len(args.inputs) > 1:
            raise HavocError(f"--sft: expected at most one conversations JSONL file, found {len(args.inputs)}")
        source = args.inputs[0] if args.inputs else builtin_conversations(args.seed)
        stats = prepare_conversations(source, tok, args.max_len, args.out, skip_invalid=args.skip_invalid)
        print(f"wrote {args.out}: {stats['conversations']:,} conversations (longest {stats['longest']} tokens, "
              f"{stats['assistant_tokens']:,} assistant tokens), {stats['skipped']} skipped")
        return

    if args.hf_dataset:
        sources: Any = hf_documents(args.hf_dataset, split=args.hf_split, text_key=args.text_key)
    else:
        sources = [Path(p) for p in args.inputs] if args.inputs else builtin_documents()
    manifest = prepare_pretrain(sources, tok, args.out, val_fraction=args.val_fraction, seed=args.seed,
                                skip_invalid=args.skip_invalid, text_key=args.text_key, name=args.hf_dataset or "",
                                workers=args.workers or default_workers(), resume=args.resume, dedup=args.dedup,
                                max_tokens=args.max_tokens, shard_tokens=args.shard_tokens)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shard(s)")
    print(f"wrote {args.out}")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, generated from the dataclass (no hand-kept list)."""


    hints = typing.get_type_hints(TrainConfig)
    p.add_argument("--config", help="TOML or JSON file of TrainConfig settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of out_dir")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "phase":
            continue
        tp, flag = hints[f.name], "--" + f.name.replace("_", "-")
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {f.default})")
        elif typing.get_origin(tp) is typing.Literal:
            p.add_argument(flag, choices=typing.get_args(tp), default=None, help=f"(default {f.default})")
        else:
            p.add_argument(flag, type=tp, default=None, help=f"(default {f.default!r})")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight storage (auto: bf16 on GPU and native-bf16 CPUs, elsewhere from 50M parameters; "
                   "serve on CPUs without native bf16: int8)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="int8 (per row) or int4 (groups of 32) weights: "
                   "faster CPU decode, slightly other logits")


def _add_generation_flags(p: argparse.ArgumentParser, defaults: Any) -> None:
    """Model flags, then one flag per ``SamplingParams`` field, generated from the dataclass (its
    ``help`` metadata), with this command's ``defaults`` shown."""


    _add_model_flags(p)
    g = p.add_argument_group("sampling")
    hints = typing.get_type_hints(SamplingParams)
    for f in dataclasses.fields(SamplingParams):
        if not f.metadata.get("cli", True):
            continue
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        shown = f"{f.metadata['help']} (default: {', '.join(default) if f.name == 'stop' else default})"
        tp = hints[f.name]
        if f.metadata.get("cli") == "json":
            g.add_argument(flag, metavar="FILE|JSON", default=None, help=f.metadata["help"])
        elif tp is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
        elif typing.get_origin(tp) is not None and str in typing.get_args(tp):  # Sequence[str]: repeatable
            g.add_argument(flag, action="append", default=None, help=f"{f.metadata['help']}")
        else:
            kind = next(t for t in (int, float) if t is tp or t in typing.get_args(tp))
            g.add_argument(flag, type=kind, default=None, help=shown)


def _sampling(args: argparse.Namespace, base: Any) -> Any:
    """``base`` SamplingParams with the sampling flags that were given."""


    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams)
             if getattr(args, f.name, None) is not None}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    if "json_schema" in given:
        given["json_schema"] = _json_schema(given["json_schema"])
    return dataclasses.replace(base, **given).validate()


def _json_schema(value: str) -> dict[str, Any]:
    """``--json-schema``: a file holding the schema, or the schema inline as JSON."""
    try:
        inline = not Path(value).is_file()
    except OSError:  # a long inline schema is too long for a file name
        inline = True
    where = "--json-schema" if inline else value
    if inline and value.lstrip()[:1] not in ("{", "["):
        raise HavocError(f"--json-schema: {value}: no such file (or give the schema inline as JSON)")
    try:
        schema = json.loads(value if inline else Path(value).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HavocError(f"{where}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise HavocError(f"{where}: expected a JSON schema object, found {type(schema).__name__}")
    return schema


def cmd_chat(args: argparse.Namespace) -> int:
    return run_chat(args.checkpoint, system=args.system, params=_sampling(args, CHAT_DEFAULTS), device=args.device,
                    dtype=args.dtype, quantize=args.quantize, compile=args.compile, prompt=args.prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args, GENERATE_DEFAULTS)
    return run_generate(args.checkpoint, args.prompt, params, device=args.device, dtype=args.dtype,
                        quantize=args.quantize)


def cmd_smoke(args: argparse.Namespace) -> int:
    return run_smoke(args.checkpoint, device=args.device, dtype=args.dtype, quantize=args.quantize,
                     params=_sampling(args, SMOKE_DEFAULTS))


def cmd_serve(args: argparse.Namespace) -> int:
    from havoc_core.serve import serve  # the [serve] extra (fastapi, uvicorn) is optional

    api_key = args.api_key or os.environ.get("HAVOC_API_KEY")
    return serve(args.checkpoint, host=args.host, port=args.port, api_key=api_key, model_name=args.model_name,
                 max_batch=args.max_batch, device=args.device, dtype=args.dtype, quantize=args.quantize,
                 threads=args.threads, pack=args.prepack)


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="havoc", description="HAVOC: train, chat with and serve small LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        p.set_defaults(handler=handler)
        return p

    p = add("inspect", cmd_inspect, "print a model config tree and its parameter count (no weights loaded)")
    p.add_argument("source", help="preset name, config.json, checkpoint dir or run dir")
    p.add_argument("--check-weights", action="store_true",
                   help="also check model.safetensors' names and shapes (header only) against the config")
    p.add_argument("--verify", action="store_true",
                   help="hash every file (optimizer.pt too) against checksums.json; name each corrupt file and tensor")

    p = add("init", cmd_init, "write a randomly initialised checkpoint")
    p.add_argument("--preset", required=True, help="preset name, config.json or checkpoint dir")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", help="tokenizer.json (or a dir with one) to store beside the weights")
    p.add_argument("--seed", type=int, default=0)

    for phase, text in [("pretrain", "pretrain a model (from a preset, config.json or checkpoint)"),
                        ("sft", "fine-tune a checkpoint on conversations (loss on assistant tokens only)")]:
        _add_train_flags(add(phase, cmd_train, text))

    p = add("demo", cmd_demo, "the whole pipeline on the built-in corpus (no download), then chat")
    p.add_argument("--minutes", type=float, default=DemoPlan.minutes,
                   help="compute budget, corpus to answers: training steps are planned from this machine's "
                        "measured speed to fit it (default %(default)s)")

    p = add("eval", cmd_eval, "benchmark scores (--tasks) or validation loss, perplexity and bits per byte (--data)")
    p.add_argument("checkpoint", help="checkpoint dir or run dir")
    p.add_argument("--data", help="`havoc prepare` dir (val split) or conversations JSONL")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=50, help="with --data: batches to evaluate")
    p.add_argument("--tasks", help="comma-separated: havoc-docs (built in), lm-eval task names, task YAML files")
    p.add_argument("--num-fewshot", type=int, help="examples in each prompt (default: each task's own)")
    p.add_argument("--limit", type=float, help="only the first N examples of each task (or a fraction < 1)")
    p.add_argument("--include-path", action="append", default=[], help="a directory of task YAML files (repeatable)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts as chat turns (for chat models), few-shot examples as earlier turns")
    p.add_argument("--dtype", default="float32", help="weights' dtype: float32 (default), bfloat16, float16, auto")
    p.add_argument("--output", help="write the full results (config, step, every metric) to this JSON file")

    p = add("plot", cmd_plot, "write RUN/loss.png from RUN/metrics.jsonl")
    p.add_argument("run", help=f"run directory, e.g. {RUN_DIRS['pretrain']}")

    p = add("export", cmd_export, "write a checkpoint as a Hugging Face Llama model dir (transformers, vLLM, ...) "
            "or as one GGUF file (llama.cpp, ollama, LM Studio)")
    p.add_argument("checkpoint", help="checkpoint dir or run dir")
    p.add_argument("out", help="hf: directory to write (config.json, model.safetensors, tokenizer files); "
                   "gguf: the .gguf file (an ollama Modelfile is written beside it)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf (default) or gguf")
    p.add_argument("--outtype", choices=list(OUTTYPES),
                   help="gguf weights: f32 (default), f16, bf16, q8_0, or q4_k_m / q4_0 (llama.cpp's quantizer)")
    p.add_argument("--force", action="store_true", help="gguf: overwrite an existing file")
    p.add_argument("--tokenizer", help="tokenizer.json (or a dir with one) if the checkpoint has none")

    p = add("quantize", cmd_quantize, "write a checkpoint's matrices as int4 or int8 for CPU inference (chat, "
            "generate, smoke, serve load it as stored, without quantizing again)")
    p.add_argument("checkpoint", help="checkpoint dir or run dir")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--quantize", choices=["int4", "int8"], default="int4",
                   help="int4: groups of 32 with a scale and zero each, int8 output head; int8: one scale per row")

    p = add("import", cmd_import, "turn a Hugging Face Llama model dir (safetensors) into a HAVOC checkpoint")
    p.add_argument("hf_dir", help="directory with config.json, model.safetensors (or shards) and tokenizer.json")
    p.add_argument("out_dir", help="checkpoint directory to write")

    p = add("tokenizer", cmd_tokenizer_train, "train a byte-level BPE tokenizer")
    t = p.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "train", help="train on text/JSONL files, or the built-in Python docs when none are given",
        formatter_class=_Help)
    t.set_defaults(handler=cmd_tokenizer_train)
    t.add_argument("files", nargs="*", help="text files (one document each), .jsonl ({\"text\": ...} per line), dirs")
    t.add_argument("--vocab-size", type=int, default=70000, help="total ids, special tokens included")
    t.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    t.add_argument("--skip-invalid", action="store_true", help="skip (and count) bad files/lines instead of failing")

    p = add("prepare", cmd_prepare, "tokenize documents into uint32 shards (or check and write SFT conversations)")
    p.add_argument("inputs", nargs="*", help="text, .jsonl(.gz/.zst), .parquet files or dirs; none = the "
                   "built-in Python docs (with --sft: one conversations .jsonl; none = the built-in conversations)")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir or tokenizer.json")
    p.add_argument("--out", required=True, help="data directory to write (with --sft: the .jsonl file)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out for validation")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and count) bad inputs instead of failing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="tokenizing processes (default: every core; the output "
                   "is the same for any number)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prepare from its last full shard")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (case and whitespace "
                   "normalised); the count is in manifest.json")
    p.add_argument("--max-tokens", type=int, help="stop after the document that brings the total to this")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file (a resume restarts "
                   "from the last full one)")
    p.add_argument("--hf-dataset", metavar="NAME[:CONFIG]",
                   help="a Hugging Face dataset, streamed, instead of files (needs `datasets`)")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl / --hf-dataset records")
    p.add_argument("--sft", action="store_true", help="conversations ({\"messages\": [...]}) instead of documents")
    p.add_argument("--max-len", type=int, default=512, help="with --sft: longest conversation in tokens (never cut)")

    p = add("chat", cmd_chat, "chat with a checkpoint in the terminal (streams replies, keeps history)")
    p.add_argument("checkpoint", nargs="?", help=f"checkpoint or run dir (default: newest under {CHAT_RUN})")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one message on stdout and exit")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (20-40 s the first time, a few s once cached; on CPU "
                        "1.7-1.9x the int8/int4 rate of small models)")
    _add_generation_flags(p, CHAT_DEFAULTS)

    p = add("generate", cmd_generate, "raw text completion of a prompt (no chat format)")
    p.add_argument("checkpoint", help="checkpoint or run dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    _add_generation_flags(p, GENERATE_DEFAULTS)

    p = add("smoke", cmd_smoke, "load a checkpoint, answer three fixed prompts, print tokens/s; "
            "non-zero exit on failure")
    p.add_argument("checkpoint", nargs="?", help=f"checkpoint or run dir (default: newest under {CHAT_RUN})")
    _add_generation_flags(p, SMOKE_DEFAULTS)

    p = add("serve", cmd_serve, "serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching) "
            "with a web chat page at /")
    p.add_argument("checkpoint", nargs="?", help=f"checkpoint or run dir (default: newest under {CHAT_RUN})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (the address is printed)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: $HAVOC_API_KEY)")
    p.add_argument("--model-name", help="model id clients send (default: run/checkpoint_step_N)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together; more wait in line")
    _add_model_flags(p)
    p.add_argument("--threads", type=int, help="torch threads for the model on CPU (default: $OMP_NUM_THREADS, "
                   "else one per core but one, which the HTTP side needs)")
    p.add_argument("--no-prepack", dest="prepack", action="store_false", default=None,
                   help="on CPU, do not keep a copy of the matrices prepacked for oneDNN: half the weight memory, "
                   "slower batched decoding (docs/SERVING.md)")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except HavocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
