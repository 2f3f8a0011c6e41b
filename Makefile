# Two commands on a fresh machine: `make demo` and `make test`.
# Every install path uses constraints.txt (mxnet 1.9.1 needs numpy<1.24; gluoncv's
# dependencies are pinned to releases that still work with it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench horovod gluonnlp docs clean

$(STAMP): setup.py setup.cfg constraints.txt mxnet_mirror_hook/core/_replay.c
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
	$(PY) -m mypy
	$(PY) -m pytest -q tests

# Horovod built against the venv's MXNet (about 70 s; needs cmake and a C++ compiler). Optional:
# tests/api/test_gluon_horovod.py skips without it.
HOROVOD_ENV := HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
	HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_CPU_OPERATIONS=gloo
horovod: $(STAMP)
	$(PIP) install -q -c constraints.txt wheel
	$(HOROVOD_ENV) $(PIP) install -q -c constraints.txt --no-build-isolation horovod

# gluonnlp 0.10 (its BERT and language models in the tests, the zoo sweep and the user runs) builds
# from its sdist with cython (about a minute). Optional: its tests skip without it.
gluonnlp: $(STAMP)
	$(PIP) install -q -c constraints.txt cython wheel
	$(PIP) install -q -c constraints.txt --no-build-isolation gluonnlp==0.10.0

# The manual (Sphinx + numpydoc + MyST, the `docs` extra, installed once: its own stamp, so
# `make test` does not pay for it). Warnings are errors; the build goes to docs/_build (git-ignored).
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP) setup.cfg
	$(PIP) install -q -c constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_memonger.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
