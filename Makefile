# Two commands on a fresh machine: `make demo` and `make test`.
# Every install path uses constraints.txt (mxnet 1.9.1 needs numpy<1.24; gluoncv's
# dependencies are pinned to releases that still work with it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

$(STAMP): setup.py setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[cpu,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_resnet.py --network resnet50_v1b --batch-size 4 --image-size 112 \
		--num-batches 3 --mirror

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_memonger.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
