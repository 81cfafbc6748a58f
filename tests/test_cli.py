"""The CLI: every command's --help shows its defaults, sampling flags come from SamplingParams and
training flags from TrainConfig (no hand-kept lists), and bad values are one line, exit 2."""

import dataclasses
import subprocess
import sys

import pytest

from havoc_core.chat import CHAT_DEFAULTS, SMOKE_DEFAULTS
from havoc_core.cli import _sampling, build_parser, main
from havoc_core.sampling import SamplingParams
from havoc_core.train_config import TrainConfig

COMMANDS = ["inspect", "init", "pretrain", "sft", "demo", "eval", "plot", "export", "import", "prepare", "chat",
            "generate", "smoke", "serve"]


def help_of(*command: str) -> str:
    out = subprocess.run([sys.executable, "-m", "havoc_core.cli", *command, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())  # argparse wraps lines


def test_every_command_has_help():
    text = help_of()
    assert all(c in text for c in COMMANDS)


def test_help_shows_defaults():
    assert "(default: 70000)" in help_of("tokenizer", "train")
    chat = help_of("chat")
    assert f"(default: {CHAT_DEFAULTS.temperature})" in chat and "(default: 1.1)" in chat
    assert f"(default: {SMOKE_DEFAULTS.max_new_tokens})" in help_of("smoke")
    assert "(default: 0.02)" in help_of("prepare") and "(default: 8000)" in help_of("serve")
    assert "(default 1000)" in help_of("pretrain")  # max_steps, from TrainConfig


def sampling_flags(parser_args: list[str]) -> set[str]:
    sub = build_parser()._subparsers._group_actions[0].choices[parser_args[0]]  # type: ignore[union-attr]
    return {a.dest for g in sub._action_groups if g.title == "sampling" for a in g._group_actions}


@pytest.mark.parametrize("command", ["chat", "generate", "smoke"])
def test_sampling_flags_are_the_sampling_fields(command):
    fields = {f.name for f in dataclasses.fields(SamplingParams) if f.metadata.get("cli", True)}
    assert sampling_flags([command]) == fields


def test_sampling_flags_parse_into_params():
    args = build_parser().parse_args(["generate", "ckpt", "--prompt", "x", "--temperature", "0", "--top-k", "5",
                                      "--stop", "a", "--stop", "b", "--ignore-eos", "--seed", "3"])
    params = _sampling(args, SamplingParams())
    assert params == SamplingParams(temperature=0.0, top_k=5, stop=("a", "b"), ignore_eos=True, seed=3)
    untouched = _sampling(build_parser().parse_args(["chat"]), CHAT_DEFAULTS)
    assert untouched == CHAT_DEFAULTS


def test_training_flags_are_the_train_config_fields():
    parser = build_parser()._subparsers._group_actions[0].choices["pretrain"]  # type: ignore[union-attr]
    flags = {a.dest for a in parser._actions} - {"help", "config", "resume"}
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)} - {"phase"}


def test_bad_sampling_value_is_one_line_exit_2(capsys):
    assert main(["chat", "nowhere", "--top-p", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: top_p: expected a number in (0, 1], found 2.0"
