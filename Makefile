# The two commands of the README: `make quickstart` and `make test`.
VENV  := .venv
STAMP := $(VENV)/.vlkit-installed
PY    := $(VENV)/bin/python

.PHONY: setup quickstart test bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(VENV)/bin/vlkit quickstart

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_vit_cpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
