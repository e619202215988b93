# Thin wrapper: `make test` and `make bench` set themselves up.
# A Python that already has jax, flax, optax and chex (a GPU image, say) is
# used as is for `bench`; otherwise both install into .venv.
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSPY  ?= python3
JOBS   ?= auto
HAVE_DEPS := $(shell $(SYSPY) -c "import jax, flax, optax, chex" >/dev/null 2>&1 && echo yes)

.PHONY: install test bench lint check clean

$(STAMP): pyproject.toml
	$(SYSPY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -n $(JOBS) remat_kit tests README.md

ifeq ($(HAVE_DEPS)$(wildcard $(STAMP)),yes)
bench:
	PYTHONPATH=. $(SYSPY) -m experiments.bench $(ARGS)
else
bench: $(STAMP)
	$(VPY) -m experiments.bench $(ARGS)
endif

lint: $(STAMP)
	$(VPY) -m ruff check remat_kit tests experiments

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache
