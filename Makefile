# Everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheels of torch 2.13 cannot load PyPI's torchvision (clean-fid needs it); this pair imports together.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

# DeepSpeed compiles its CPU communication op once (about 40 s) into the git-ignored .torch_extensions/.
test: install
	OMP_NUM_THREADS=2 TORCH_EXTENSIONS_DIR=$(CURDIR)/.torch_extensions $(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow"

demo: install
	$(BIN)/elbodiff demo --out demo-out

clean:
	rm -rf $(VENV) demo-out *.egg-info
