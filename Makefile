# Thin wrapper: `make test` and `make bench` set themselves up.
# A Python that already has jax, flax, optax and chex (a GPU image, say) is
# used as is for `bench`; otherwise both install into .venv.
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSPY  ?= python3
JOBS   ?= auto
HAVE_DEPS := $(shell $(SYSPY) -c "import jax, flax, optax, chex" >/dev/null 2>&1 && echo yes)

# The lowest JAX that pyproject.toml admits; `make test` runs a smoke subset on it.
MIN_JAX  := 0.10.0
VMIN     := .venv-min
VMIN_PY  := $(VMIN)/bin/python
VMIN_STAMP := $(VMIN)/.installed
SMOKE    := tests/test__jax.py tests/test_dispatch.py tests/test_layout.py \
            tests/test_policies.py tests/test_transforms.py tests/test_flax_linen.py

.PHONY: install test test-min bench bench-refresh lint check clean

$(STAMP): pyproject.toml
	$(SYSPY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[dev]"
	# Deviceless TPU and GPU compiles (remat_kit.targets), pinned to the installed jax.
	V=$$($(VPY) -c "import jax; print(jax.__version__)") && \
	  $(VPY) -m pip install -q "jax[tpu]==$$V" "jax-cuda12-plugin==$$V"
	touch $(STAMP)

$(VMIN_STAMP): pyproject.toml
	$(SYSPY) -m venv $(VMIN)
	$(VMIN_PY) -m pip install -q --upgrade pip
	$(VMIN_PY) -m pip install -q "jax==$(MIN_JAX)" "jaxlib==$(MIN_JAX)" -e ".[dev]"
	touch $(VMIN_STAMP)

install: $(STAMP)

test: $(STAMP) test-min
	$(VPY) -m pytest -q -n $(JOBS) remat_kit tests README.md

test-min: $(VMIN_STAMP)
	@$(VMIN_PY) -c "import jax; assert jax.__version__ == '$(MIN_JAX)', jax.__version__; print('smoke subset on jax', jax.__version__)"
	$(VMIN_PY) -m pytest -q -n $(JOBS) -p no:cacheprovider $(SMOKE)

ifeq ($(HAVE_DEPS)$(wildcard $(STAMP)),yes)
bench:
	PYTHONPATH=. $(SYSPY) -m experiments.bench $(ARGS)
else
bench: $(STAMP)
	$(VPY) -m experiments.bench $(ARGS)
endif

# Rewrites the committed results in experiments/results (plain `make bench` writes
# to the git-ignored experiments/results/local).
bench-refresh:
	$(MAKE) bench ARGS="--refresh $(ARGS)"

lint: $(STAMP)
	$(VPY) -m ruff check remat_kit tests experiments

check: lint test

clean:
	rm -rf $(VENV) $(VMIN) .pytest_cache
