# Two commands from a fresh clone (Python >= 3.10, pip, make), both safe to run again:
#
#   make demo   set up .venv, export the shipped model, explain the sample scenes, print where the pictures are
#   make test   set up .venv and .venv-lean, lint and type-check, run the tests (what CI runs)
#
# Each step is redone only when its inputs change: its stamp file is named after a hash of them
# (tools/fingerprint.py), so a second run reuses the venvs and the test models.

PYTHON ?= python3
VENV := .venv
LEAN := .venv-lean
MODELS := models
DEMO_OUT := out/demo
TEST_MODELS := .ci-models
SHIPPED := $(MODELS)/shapes-clip__open_clip_model__64

DEPS := $(shell $(PYTHON) tools/fingerprint.py pyproject.toml constraints.txt tools/shapes/pyproject.toml)
CODE := $(shell $(PYTHON) tools/fingerprint.py pyproject.toml export runtime tests/tiny_models.py)
STAMP := $(VENV)/.installed-$(DEPS)
LEAN_STAMP := $(LEAN)/.installed-$(DEPS)
MODELS_STAMP := $(TEST_MODELS)/.exported-$(CODE)

.PHONY: demo test setup lint help print-stamps

help:
	@sed -n '1,7p' Makefile

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[export,cpu,test,serve,ray]" -e tools/shapes
	rm -f $(VENV)/.installed-* && touch $@

# the runtime alone, without torch: the proof that production installs stay lean
$(LEAN_STAMP):
	$(PYTHON) -m venv $(LEAN)
	$(LEAN)/bin/pip install -q -e ".[cpu]" pytest hypothesis
	rm -f $(LEAN)/.installed-* && touch $@

# tiny random-init model folders the runtime tests (in both venvs) load
$(MODELS_STAMP): $(STAMP)
	rm -rf $(TEST_MODELS)
	$(VENV)/bin/python tests/tiny_models.py $(TEST_MODELS)
	touch $@

setup: $(STAMP) $(LEAN_STAMP) $(MODELS_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy runtime/

demo: $(STAMP)
	$(VENV)/bin/legrad-export --model assets/shapes-clip --out $(MODELS) --overwrite
	$(VENV)/bin/python examples/demo.py $(SHIPPED) assets/sample --out $(DEMO_OUT)

test: setup lint
	LEGRAD_TEST_MODEL_DIR=$(TEST_MODELS) $(VENV)/bin/python -m pytest -n 2 --dist loadfile
	LEGRAD_TEST_MODEL_DIR=$(TEST_MODELS) $(LEAN)/bin/python -m pytest tests/runtime tests/serve -m "not torch"

# the stamp files, for tests/test_first_use.py (it links a checkout's venvs into a fresh clone)
print-stamps:
	@echo $(STAMP) $(LEAN_STAMP) $(MODELS_STAMP)
