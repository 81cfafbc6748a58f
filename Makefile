# Two set-up commands on a fresh machine: `make demo` and `make test` (see README.md).
PY := .venv/bin/python
DEMO_VENV := .venv/.installed-demo
VENV := .venv/.installed

.PHONY: demo test bench install clean browser

# the demo needs the light half (torch, tokenizers, matplotlib): a first contact waits for nothing else
$(DEMO_VENV): pyproject.toml
	python3 -m venv .venv
	# torch first and pinned: the CPU wheel that lies on this disk, never a multi-GB CUDA download
	.venv/bin/pip install torch==2.13.0
	.venv/bin/pip install -e ".[train]"
	touch $@

# the tests drive everything: the serving stack, transformers, lm-eval, the openai client, ...
$(VENV): $(DEMO_VENV)
	# llama-cpp-python compiles llama.cpp (tests/test_gguf.py): on every core
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) .venv/bin/pip install -e ".[dev]"
	touch $@

install: $(VENV)

demo: $(DEMO_VENV)
	.venv/bin/havoc demo

test: $(VENV) browser
	.venv/bin/ruff check src tests bench chat_havoc.py test_chat.py
	$(PY) -m pytest -q

# the web-page tests drive Debian's chromium: installed here when root (as .ci/run does), else one line why they skip
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "note: /usr/bin/chromium missing and not root: the browser tests will be skipped (sudo apt-get install chromium)"; \
	elif ! command -v apt-get >/dev/null; then echo "note: /usr/bin/chromium missing and no apt-get: the browser tests will be skipped"; \
	else { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: apt-get install chromium failed: the browser tests will be skipped"; fi

bench: $(VENV)  # each prints HAVOC vs transformers on the same shapes, as ratios
	$(PY) bench/train_throughput.py
	$(PY) bench/decode.py
	$(PY) bench/serve.py
	$(PY) bench/tokenizer.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
