# Thin wrapper: `make test` and `make bench` set themselves up, from the committed locks.
#
# Legs (each a venv of its own, installed on first use, exactly as its lock in locks/ says):
#   .venv       the newest Python >= 3.12 here (.ci/pick-python) with locks/newest-py3.X.txt:
#               the newest JAX, its deviceless compilers (libtpu, the CUDA plugin), the dev,
#               docs and bench extras. The full suite. Without Python >= 3.12:
#               locks/newest-py3.11.txt (JAX 0.10.2), said out loud.
#   .venv-0.11  Python 3.12 with locks/jax-0.11.2.txt (the GPU machine's JAX): a subset.
#   .venv-min   Python 3.11 with locks/jax-0.10.0.txt (the lowest pyproject.toml admits): a subset.
# A leg whose Python is missing is skipped with a message, never silently.
# Installs use uv (pinned below, itself installed into .uv/ with pip): `uv pip sync` makes a
# venv hold exactly its lock. `make lock` moves the locks to the newest JAX (.ci/lock.py).
# Each venv gets a startup hook (.ci/quiet_start.py): on a machine with no GPU or TPU, and
# JAX_PLATFORMS unset, it sets JAX_PLATFORMS=cpu so the CUDA plugin and libtpu stay quiet.
# `make bench` uses a Python that already has jax, flax, optax and chex (a GPU image)
# as is; otherwise .venv.
UV_VERSION := 0.13.9
SYSPY  ?= python3
JOBS   ?= auto
UV     := .uv/bin/uv
HAVE_DEPS := $(shell $(SYSPY) -c "import jax, flax, optax, chex" >/dev/null 2>&1 && echo yes)

VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NEWPY  := $(shell .ci/pick-python 2>/dev/null)
NEW_MINOR := $(shell $(NEWPY) -c "import sys; print('%d.%d' % sys.version_info[:2])" 2>/dev/null)
NEW_LOCK  := locks/newest-py$(NEW_MINOR).txt
# The deviceless targets the newest lock has compilers for: their tests must run, not skip.
NEW_TARGETS := $(shell sed -n 's/^\# targets: //p' $(NEW_LOCK) 2>/dev/null | tr ' ' ',' | sed 's/^none$$//')

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
            tests/test_conformance.py tests/test_lock.py tests/test_auto_remat.py
MID_TESTS := $(SMOKE) tests/test_flax_nnx.py tests/test_flax_signatures.py tests/test_report_core.py \
             tests/test_report_summary.py

.PHONY: install test test-quick test-new test-mid test-min bench bench-refresh lint typecheck check clean versions docs lock

# uv itself, pinned, in a venv of its own (pip reads this machine's pip configuration; uv
# reads UV_* variables and uv.toml, not pip's: see the README's install section).
$(UV):
	$(SYSPY) -m venv .uv
	.uv/bin/python -m pip install -q "uv==$(UV_VERSION)"

# $(call venv,DIR,PYTHON,LOCK): DIR holds exactly LOCK, remat_kit (editable) and the hook.
define venv
	rm -rf $(1)
	UV_PYTHON_DOWNLOADS=never $(UV) venv -q --python $(2) $(1)
	$(UV) pip sync -q --python $(1)/bin/python $(3)
	$(UV) pip install -q --python $(1)/bin/python --no-deps -e .
	$(1)/bin/python .ci/quiet_start.py --install $(1)
	echo $(3) > $(1)/.lock
	touch $(1)/.installed
endef

$(STAMP): $(NEW_LOCK) pyproject.toml .ci/quiet_start.py | $(UV)
	@test -n "$(NEWPY)" || { .ci/pick-python; exit 1; }
	@.ci/pick-python >/dev/null
	@test -f $(NEW_LOCK) || { echo "no $(NEW_LOCK): run make lock"; exit 1; }
	$(call venv,$(VENV),$(NEWPY),$(NEW_LOCK))

$(VMIN_STAMP): locks/jax-$(MIN_JAX).txt pyproject.toml .ci/quiet_start.py | $(UV)
	$(call venv,$(VMIN),$(PY311),locks/jax-$(MIN_JAX).txt)

$(VMID_STAMP): locks/jax-$(MID_JAX).txt pyproject.toml .ci/quiet_start.py | $(UV)
	$(call venv,$(VMID),$(PY312),locks/jax-$(MID_JAX).txt)

install: $(STAMP)

test: test-new test-mid test-min

# The newest leg without the tests marked slow (deviceless compiles at real sizes,
# subprocesses, whole benches): a few minutes while editing. CI runs everything.
test-quick: $(STAMP)
	$(VPY) -m pytest -q -n $(JOBS) -m "not slow" remat_kit tests

test-new: $(STAMP)
	@$(VPY) -c "import sys, jax, flax; print('full suite on Python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'from $(NEW_LOCK); targets that must not skip: $(or $(NEW_TARGETS),none)')"
	REMAT_KIT_REQUIRE_TARGETS=$(NEW_TARGETS) $(VPY) -m pytest -q -n $(JOBS) --dist worksteal --durations=15 remat_kit tests README.md docs/*.md

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

# Moves every lock to the newest JAX and Flax (and the compilers that work with them),
# says what it substituted, then runs `make test` on the new locks (ARGS="--no-test" skips).
lock: | $(UV)
	$(SYSPY) .ci/lock.py --uv $(UV) $(ARGS)

versions: $(STAMP)
	$(VPY) -m remat_kit versions

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about MkDocs 2.0 (not a build warning).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VPY) -m ruff check remat_kit tests experiments pytest_remat_kit.py conftest.py .ci/*.py

# mypy over the package ([tool.mypy] in pyproject.toml); CI runs it too.
typecheck: $(STAMP)
	$(VPY) -m mypy remat_kit

check: lint typecheck test

clean:
	rm -rf $(VENV) $(VMIN) $(VMID) .uv .pytest_cache site
