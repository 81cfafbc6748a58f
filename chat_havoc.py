"""`python chat_havoc.py [CHECKPOINT]` is `havoc chat [CHECKPOINT]`."""
import sys

from havoc_core.cli import main

sys.exit(main(["chat", *sys.argv[1:]]))
