# moerging — one target per job. Every target that needs the venv depends on `setup`.
#   make setup          venv + all dependencies at the tested versions (requirements/constraints.txt;
#                       CPU torch here, CUDA torch on a GPU machine)
#   make test           default test suite (micro models, offline, ~minutes)
#   make smoke          every documented command on micro configs
#   make tables         every tiny reproduction table (SCALE=paper: the papers' settings, GPUs + network)
#   make table-<name>   one project's table (SCALE=real: on the SmolLM2 expert zoo)
#   make zoo / leaderboard / real   the real arm: expert zoo, leaderboard, everything in order
#   make lint           ruff
#   make gpu-check      on a CUDA machine: micro pipelines on the GPU, Triton kernel, bf16, GPU timings (<5 min)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= tiny
# The pinned torch resolves to the CPU wheel on these machines (it lies in pip's find-links) and to
# PyPI's default CUDA build on a GPU machine. CPU-only users elsewhere can add
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# Every install holds packages to the tested releases (requirements/constraints.txt); PIN= lets pip choose.
PIN ?= -c requirements/constraints.txt
# Caches (tiny bases, tokenised data, statistics) live in the checkout unless the caller points elsewhere.
export MOERGING_CACHE ?= $(CURDIR)/.cache/moerging
PROJECTS := compatible_specialization mbc_arrow phatgoose mats smile
OFFLINE_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ifeq ($(SCALE),paper)
RUN_ENV :=
else
RUN_ENV := $(OFFLINE_ENV) OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
endif

.PHONY: setup test test-all smoke lint gpu-check tables tiny-bases zoo leaderboard real benchmarks bench bench-peers clean $(addprefix table-,$(PROJECTS))

STAMP := $(VENV)/.installed
setup: $(STAMP)
$(STAMP): pyproject.toml $(wildcard requirements/*.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIN) $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -q $(PIN) -e ".[dev,triton,tensorboard]"
	$(PY) -m pip install -q $(PIN) --no-deps -r requirements/assets.txt
	$(PY) -m pip install -q $(PIN) -r requirements/assets-deps.txt
	$(PY) -m pip install -q $(PIN) --no-deps --ignore-requires-python -r requirements/assets-py312.txt
	touch $(STAMP)

test: setup
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-all: setup
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(PY) -m pytest -q -m ""

smoke: setup
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(PY) -m pytest -q -m smoke

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The real arm's expert zoo (common/zoo.py): the SmolLM2-135M LoRA experts (routing and merging) and MaTS's
# (IA)^3 and full fine-tuning zoos on zoo.MERGE_TASKS; hours on one core, cached and resumable; a second run
# trains nothing. ZOO_SEEDS=0 for one seed; MERGE_ZOOS= for the LoRA zoo alone.
ZOO_SEEDS ?= 0 1
MERGE_ZOOS ?= ia3 full
zoo: setup
	@for a in lora $(MERGE_ZOOS); do \
	  $(OFFLINE_ENV) OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m common.zoo --adapter $$a --seeds $(ZOO_SEEDS) || exit 1; done

# Every routing and merging method on the zoo (leaderboard/): needs `make zoo`; results/leaderboard/ (table, plot)
# and the leaderboard section of RESULTS.md. MaTS's merges on the (IA)^3 and full zoos first (results/leaderboard/
# ia3, full), so that the section, written with the LoRA zoo's run, shows them.
leaderboard: setup
	@for a in $(MERGE_ZOOS) lora; do \
	  $(OFFLINE_ENV) OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m leaderboard.run --adapter $$a --seeds $(ZOO_SEEDS) || exit 1; done

# The whole real arm in its order (each step cached and resumable; days on one core: README "The real scale").
real: setup
	$(MAKE) zoo
	@for p in phatgoose mbc_arrow smile compatible_specialization mats; do SCALE=real $(MAKE) table-$$p || exit 1; done
	$(MAKE) leaderboard

tiny-bases: setup
	$(RUN_ENV) $(PY) -m common.tiny_world --scale tiny

tables: $(addprefix table-,$(PROJECTS))
	$(RUN_ENV) $(PY) -m common.results_md --runs runs --out RESULTS.md

# Each project's table target runs its table script if present (projects/<name>/table.sh).
$(addprefix table-,$(PROJECTS)): table-%: setup
	@if [ -f projects/$*/table.sh ]; then $(RUN_ENV) SCALE=$(SCALE) PY=$(PY) bash projects/$*/table.sh; \
	 else echo "table-$*: not built yet (see the project's issue)"; fi

bench: benchmarks

# THP_MEM_ALLOC_ENABLE: torch's allocator asks for huge pages (fewer page faults on fresh merge outputs).
benchmarks: setup
	@for b in $(filter-out benchmarks/gpu_check.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; \
	  $(RUN_ENV) THP_MEM_ALLOC_ENABLE=1 $(PY) $$b || exit 1; done

# The checks only a GPU can run (benchmarks/gpu_check.py): exits 2 with a message on a machine without CUDA.
gpu-check: setup
	$(OFFLINE_ENV) $(PY) benchmarks/gpu_check.py --device cuda

# The peer libraries in their own venv (not CI): the benchmark scripts time them there when it exists.
PEERS_VENV ?= .venv-peers
PEERS ?= mergekit==0.1.5 fusion-bench==0.2.33
bench-peers: $(PEERS_VENV)/.installed
$(PEERS_VENV)/.installed:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	@for p in $(PEERS); do $(PEERS_VENV)/bin/python -m pip install -q "$(TORCH)" "$$p" \
	  || { echo "bench-peers: $$p failed to install into $(PEERS_VENV) (see pip's error above)"; exit 1; }; done
	touch $@

clean:
	rm -rf runs .pytest_cache
