# Two set-up commands on a fresh machine: `make demo` and `make test` (see README.md).
PY := .venv/bin/python
VENV := .venv/.installed

.PHONY: demo test lint bench install clean

$(VENV): pyproject.toml
	python3 -m venv .venv
	# torch first and pinned: the CPU wheel that lies on this disk, never a multi-GB CUDA download
	.venv/bin/pip install torch==2.13.0
	.venv/bin/pip install -e ".[dev]"
	touch $@

install: $(VENV)

demo: $(VENV)
	.venv/bin/havoc demo

test: $(VENV)
	.venv/bin/ruff check src tests bench chat_havoc.py
	$(PY) -m pytest -q

bench: $(VENV)
	$(PY) bench/run_all.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
