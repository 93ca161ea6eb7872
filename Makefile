# Two commands do everything on a fresh machine:  make demo  /  make test
# Both create .venv when it is missing (or when pyproject.toml / constraints.txt changed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install -c constraints.txt

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml constraints.txt scripts/cpu_torchaudio.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(BIN)/python scripts/cpu_torchaudio.py
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/audioscenic demo --workdir work/demo

# Two pytest-xdist workers, a test file each at a time (module fixtures run once), longest files first
# (tests/conftest.py): the service and whole-pipeline tests mostly wait, so they overlap the rest.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf work .pytest_cache
