"""`python test_chat.py [CHECKPOINT]` is `havoc smoke [CHECKPOINT]`: load the model (default: the newest
checkpoint under checkpoints/havoc_phase1_sft) and answer 3 test prompts; non-zero exit on failure.
A script, not a pytest module: it defines no tests and does nothing on import."""
import sys

from havoc_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["smoke", *sys.argv[1:]]))
