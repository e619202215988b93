# Thin wrapper: `make test` and `make bench` set themselves up.
#
# Legs (each a venv of its own, installed on first use):
#   .venv       the newest Python >= 3.12 here (.ci/pick-python) with the newest JAX pip
#               gives, plus libtpu and the CUDA plugin pinned to it: the full suite.
#               Without Python >= 3.12: python3.11 with JAX 0.10.2, said out loud.
#   .venv-0.11  Python 3.12 with JAX 0.11.2 (the GPU machine's version): a subset.
#   .venv-min   Python 3.11 with JAX 0.10.0 (the lowest pyproject.toml admits): a subset.
# A leg whose Python is missing is skipped with a message, never silently.
# `make bench` uses a Python that already has jax, flax, optax and chex (a GPU image)
# as is; otherwise .venv.
# `make docs` builds the site in docs/ strictly (warnings are errors) into site/ (git-ignored),
# with the `docs` extra installed into .venv.
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
SYSPY  ?= python3
JOBS   ?= auto
HAVE_DEPS := $(shell $(SYSPY) -c "import jax, flax, optax, chex" >/dev/null 2>&1 && echo yes)

NEWPY  := $(shell .ci/pick-python 2>/dev/null)
NEW_JAX := $(shell $(NEWPY) -c "import sys; print('' if sys.version_info >= (3, 12) else '==0.10.2')" 2>/dev/null)

MIN_JAX  := 0.10.0
VMIN     := .venv-min
VMIN_PY  := $(VMIN)/bin/python
VMIN_STAMP := $(VMIN)/.installed
PY311    := $(shell .ci/pick-python 3.11 2>/dev/null)

MID_JAX  := 0.11.2
VMID     := .venv-0.11
VMID_PY  := $(VMID)/bin/python
VMID_STAMP := $(VMID)/.installed
PY312    := $(shell .ci/pick-python 3.12 2>/dev/null)

# The subsets run on the older legs: the JAX boundary, policies, dispatch, transforms,
# Flax, the jax.checkpoint conformance suite and the readouts that parse jaxprs (scan
# layouts differ across these versions).
SMOKE    := tests/test__jax.py tests/test__jaxpr.py tests/test__xla.py tests/test_dispatch.py tests/test_layout.py \
            tests/test_policies.py tests/test_transforms.py tests/test_flax_linen.py \
            tests/test_conformance.py
MID_TESTS := $(SMOKE) tests/test_flax_nnx.py tests/test_flax_signatures.py tests/test_report_core.py \
             tests/test_report_summary.py

.PHONY: install test test-quick test-new test-mid test-min bench bench-refresh lint typecheck check clean versions docs

$(STAMP): pyproject.toml
	@test -n "$(NEWPY)" || { .ci/pick-python; exit 1; }
	@.ci/pick-python >/dev/null
	$(NEWPY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "jax$(NEW_JAX)" "jaxlib$(NEW_JAX)" -e ".[dev]"
	# Deviceless TPU and GPU compiles (remat_kit.targets), pinned to the installed jax.
	V=$$($(VPY) -c "import jax; print(jax.__version__)") && \
	  $(VPY) -m pip install -q "jax[tpu]==$$V" "jax-cuda12-plugin==$$V"
	touch $(STAMP)

$(VMIN_STAMP): pyproject.toml
	$(PY311) -m venv $(VMIN)
	$(VMIN_PY) -m pip install -q --upgrade pip
	$(VMIN_PY) -m pip install -q "jax==$(MIN_JAX)" "jaxlib==$(MIN_JAX)" -e ".[dev]"
	touch $(VMIN_STAMP)

$(VMID_STAMP): pyproject.toml
	$(PY312) -m venv $(VMID)
	$(VMID_PY) -m pip install -q --upgrade pip
	$(VMID_PY) -m pip install -q "jax==$(MID_JAX)" "jaxlib==$(MID_JAX)" -e ".[dev]"
	touch $(VMID_STAMP)

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(VPY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

install: $(STAMP)

test: test-new test-mid test-min

# The newest leg without the tests marked slow (deviceless compiles at real sizes,
# subprocesses, whole benches): a few minutes while editing. CI runs everything.
test-quick: $(STAMP)
	$(VPY) -m pytest -q -n $(JOBS) -m "not slow" remat_kit tests

test-new: $(STAMP)
	@$(VPY) -c "import sys, jax, flax; print('full suite on Python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__)"
	$(VPY) -m pytest -q -n $(JOBS) remat_kit tests README.md docs/*.md

ifeq ($(PY312),)
test-mid:
	@echo "test-mid: SKIPPED, no Python 3.12 here for JAX $(MID_JAX) (see .ci/pick-python)"
else
test-mid: $(VMID_STAMP)
	@$(VMID_PY) -c "import jax; assert jax.__version__ == '$(MID_JAX)', jax.__version__; print('subset on jax', jax.__version__)"
	$(VMID_PY) -m pytest -q -n $(JOBS) -p no:cacheprovider $(MID_TESTS)
endif

ifeq ($(PY311),)
test-min:
	@echo "test-min: SKIPPED, no Python 3.11 here for JAX $(MIN_JAX) (see .ci/pick-python)"
else
test-min: $(VMIN_STAMP)
	@$(VMIN_PY) -c "import jax; assert jax.__version__ == '$(MIN_JAX)', jax.__version__; print('subset on jax', jax.__version__)"
	$(VMIN_PY) -m pytest -q -n $(JOBS) -p no:cacheprovider $(SMOKE)
endif

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

versions: $(STAMP)
	$(VPY) -m remat_kit versions

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about MkDocs 2.0 (not a build warning).
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VPY) -m ruff check remat_kit tests experiments pytest_remat_kit.py conftest.py

# mypy over the package ([tool.mypy] in pyproject.toml); CI runs it too.
typecheck: $(STAMP)
	$(VPY) -m mypy remat_kit

check: lint typecheck test

clean:
	rm -rf $(VENV) $(VMIN) $(VMID) .pytest_cache site
