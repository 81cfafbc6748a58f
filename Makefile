# Two set-up commands on a fresh machine: `make demo` and `make test` (see README.md).
PY := .venv/bin/python
VENV := .venv/.installed

.PHONY: demo test bench install clean

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
	.venv/bin/ruff check src tests bench chat_havoc.py test_chat.py
	$(PY) -m pytest -q

bench: $(VENV)  # each prints HAVOC vs transformers on the same shapes, as ratios
	$(PY) bench/train_throughput.py
	$(PY) bench/decode.py
	$(PY) bench/serve.py
	$(PY) bench/tokenizer.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
