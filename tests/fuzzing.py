"""What the fuzz suites share: the seed (``HAVOC_FUZZ_SEED`` replays a failure), the 5-second bound
on every case, and the hostile values tried in every field."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from havoc_core.errors import HavocError

SEED = int(os.environ.get("HAVOC_FUZZ_SEED", "16"))
CASE_SECONDS = 5.0

MUTATIONS: list[tuple[str, Any]] = [
    ("zero", 0), ("negative", -1), ("minus one half", -0.5), ("huge int", 10**12), ("vast int", 10**30),
    ("max int64", 2**63 - 1), ("one", 1), ("two", 2), ("float", 1.5), ("NaN", math.nan), ("Infinity", math.inf),
    ("-Infinity", -math.inf), ("string", "12"), ("empty string", ""), ("null", None), ("true", True),
    ("false", False), ("list", [1, 2]), ("object", {"a": 1}), ("silu", "silu"), ("gelu", "gelu"),
    ("tiny float", 1e-300), ("big float", 1e300), ("odd", 7), ("sixty-four", 64), ("1e6 layers", 1_000_000),
]


def bounded(fn: Callable[[], Any], what: str, seconds: float = CASE_SECONDS) -> tuple[str, Any]:
    """Run ``fn`` in a thread for at most ``seconds``: ("ok", value) or ("refused", message); a
    hang or any other exception fails with ``what``."""
    out: list[tuple[str, Any]] = []

    def work() -> None:
        try:
            out.append(("ok", fn()))
        except HavocError as e:
            out.append(("refused", str(e)))
        except BaseException as e:  # noqa: BLE001 - a traceback is what the fuzz is looking for
            out.append(("crash", f"{e.__class__.__name__}: {e}"))

    t0 = time.monotonic()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"seed {SEED}: {what}: no answer in {seconds:.1f} s"
    assert time.monotonic() - t0 < seconds, f"seed {SEED}: {what}: took over {seconds:.1f} s"
    kind, value = out[0]
    assert kind != "crash", f"seed {SEED}: {what}: {value}"
    if kind == "refused":
        assert "\n" not in value and value, f"seed {SEED}: {what}: not one line: {value!r}"
    return kind, value
