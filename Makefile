# Two commands do all set-up: `make run` and `make test` (both create .venv when missing).
# Set-up installs the committed lock (requirements.lock), never whatever is newest that day.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# torch is installed first and outside the lock, so a GPU machine can take a CUDA build of the
# same version. torch==2.13.0 picks the CPU wheel on disk; a looser spec makes pip fetch the
# newest CUDA build (GBs). GPU users:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make test
TORCH_VERSION := 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
# The build the lock is resolved against (its metadata lists no CUDA packages).
TORCH_LOCK_SPEC := torch==$(TORCH_VERSION)+cpu
UPGRADE_VENV ?= .venv-upgrade
# The lmms-eval extra (the paper's benchmark table, docs/evaluation.md): its own lock, resolved
# against $(LOCK), in its own venv layered over $(VENV); `make run` never installs it.
LMMS_VENV ?= .venv-lmms
LMMS_LOCK := requirements-lmms.lock
LMMS_TESTS := tests/lmms
LMMS_PYTEST_ARGS ?=
# torchvision (lmms-eval declares it, our adapter does not use it) is left out of the lmms lock: PyPI's
# wheel is a CUDA build that breaks `import torchvision` on the CPU torch. GPU users:
#   TORCHVISION_SPEC="torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cu128" make setup-lmms
TORCHVISION_SPEC ?=
# The local runs and tests send no usage telemetry (MLflow's, the Prefect server's, DVC's).
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
PYTEST_ARGS ?=

.PHONY: setup setup-lmms run test lint format lock upgrade-check clean

# $(call install_env,VENV,LOCKFILE): a venv holding exactly the lock (+ torch and this project).
# pip goes first on its own (replacing the installer in the middle of an install is fragile);
# then every pin with its hashes and no resolution (--no-deps: the lock is complete).
define install_env
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install --quiet --no-deps --require-hashes \
	  -r <(awk '/^pip==/{p=1; print; next} p && /^ /{print; next} {p=0}' $(2))
	$(1)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(1)/bin/python -m pip install --quiet --no-deps --require-hashes -r $(2)
	$(1)/bin/python tools/lockfile.py check-pyproject --lock $(2)
	$(1)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(1)/bin/python -m pip check
	$(1)/bin/python tools/lockfile.py check-installed --lock $(2)
endef

# $(call install_layer,LAYER,LOCKFILE,BASE_VENV,BASE_LOCK): a venv that sees BASE_VENV's packages
# (a .pth line) and installs only the pins of LOCKFILE that BASE_LOCK lacks or pins otherwise (the
# lmms lock: ~60 of ~290, ~270 MB, instead of a second copy of torch and the rest), with hashes and
# no resolution; the project again (its entry points), then the checks of install_env on the whole lock.
define install_layer
	test -x $(1)/bin/python || python3 -m venv --without-pip $(1)
	$(3)/bin/python tools/lockfile.py link-base $(1) $(3)
	$(1)/bin/python tools/lockfile.py check-pyproject --lock $(2) --base $(4)
	$(1)/bin/python tools/lockfile.py layer --lock $(2) --base $(4) -o $(1)/layer-requirements.txt
	$(1)/bin/python -m pip install --quiet --no-deps --require-hashes --no-compile --no-build-isolation \
	  -r $(1)/layer-requirements.txt
	$(if $(TORCHVISION_SPEC),$(1)/bin/python -m pip install --quiet --no-deps $(TORCHVISION_SPEC))
	$(1)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(1)/bin/python tools/lockfile.py pip-check --lock $(2)
	$(1)/bin/python tools/lockfile.py check-installed --lock $(2)
endef

$(VENV)/.installed: $(LOCK) pyproject.toml
	$(call install_env,$(VENV),$(LOCK))
	touch $@

setup: $(VENV)/.installed

$(LMMS_VENV)/.installed: $(LMMS_LOCK) $(LOCK) pyproject.toml $(VENV)/.installed
	$(call install_layer,$(LMMS_VENV),$(LMMS_LOCK),$(VENV),$(LOCK))
	touch $@

setup-lmms: $(LMMS_VENV)/.installed

# The moe-tuning/full Prefect deployment on the embedded defaults (local Prefect server, SQLite
# MLflow, DVC); extra Hydra overrides: make run RUN_ARGS="stage.lr=1e-3".
run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m flows.local $(RUN_ARGS)

# pytest exit 5 = "no tests collected": a test run that tests nothing must fail, not pass.
# The lmms-eval tests ($(LMMS_TESTS)) run in $(LMMS_VENV); the main suite skips collecting them.
test: setup setup-lmms
	$(VENV)/bin/ruff check src tests tools flows
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; rc=1; fi; \
	$(LMMS_VENV)/bin/python -m pytest $(LMMS_TESTS) $(LMMS_PYTEST_ARGS); lrc=$$?; \
	if [ $$lrc -eq 5 ]; then echo "make test: pytest collected no lmms-eval tests" >&2; lrc=1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$lrc

lint: setup
	$(VENV)/bin/ruff check src tests tools flows
	$(VENV)/bin/ruff format --check src tests tools flows

format: setup
	$(VENV)/bin/ruff check --fix src tests tools flows
	$(VENV)/bin/ruff format src tests tools flows

# Re-resolve the lock after a change to pyproject.toml, keeping every pin that still fits.
# Move the lock to the newest releases only after `make upgrade-check` passed:
#   make lock LOCK_ARGS=--upgrade
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $$(grep -Eo '^(uv|packaging)==[^ ]+' $(LOCK) || echo uv packaging)
	$(PY) tools/lockfile.py compile --torch '$(TORCH_LOCK_SPEC)' $(LOCK_ARGS)
	$(PY) tools/lockfile.py compile --torch '$(TORCH_LOCK_SPEC)' -o $(LMMS_LOCK) $(LOCK_ARGS)

# Resolve the newest allowed versions into a scratch venv and run lint + the suite there;
# prints which packages moved against the lock. Changes nothing in the lock or in .venv.
upgrade-check: setup
	rm -rf $(UPGRADE_VENV) $(UPGRADE_VENV)-lmms && mkdir -p $(UPGRADE_VENV)
	$(PY) tools/lockfile.py compile --torch '$(TORCH_LOCK_SPEC)' --upgrade -o $(UPGRADE_VENV)/requirements.lock
	$(PY) tools/lockfile.py compile --torch '$(TORCH_LOCK_SPEC)' --upgrade -o $(UPGRADE_VENV)/$(LMMS_LOCK) \
	  --base $(UPGRADE_VENV)/requirements.lock
	@echo "Packages that move against $(LOCK):"; $(PY) tools/lockfile.py diff $(LOCK) $(UPGRADE_VENV)/requirements.lock
	@echo "Packages that move against $(LMMS_LOCK):"; $(PY) tools/lockfile.py diff $(LMMS_LOCK) $(UPGRADE_VENV)/$(LMMS_LOCK)
	$(call install_env,$(UPGRADE_VENV),$(UPGRADE_VENV)/requirements.lock)
	$(call install_layer,$(UPGRADE_VENV)-lmms,$(UPGRADE_VENV)/$(LMMS_LOCK),$(UPGRADE_VENV),$(UPGRADE_VENV)/requirements.lock)
	$(UPGRADE_VENV)/bin/ruff check src tests tools flows
	MOE_TUNING_LOCK=$(UPGRADE_VENV)/requirements.lock $(UPGRADE_VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	MOE_TUNING_LOCK=$(UPGRADE_VENV)/requirements.lock $(UPGRADE_VENV)-lmms/bin/python -m pytest -p no:cacheprovider $(LMMS_TESTS) $(LMMS_PYTEST_ARGS); lrc=$$?; \
	if [ $$rc -eq 0 ]; then rc=$$lrc; fi; \
	echo "Packages that moved:"; $(PY) tools/lockfile.py diff $(LOCK) $(UPGRADE_VENV)/requirements.lock; \
	$(PY) tools/lockfile.py diff $(LMMS_LOCK) $(UPGRADE_VENV)/$(LMMS_LOCK); \
	if [ $$rc -eq 0 ]; then echo "upgrade-check: the suite passes on the newest versions; move the lock with: make lock LOCK_ARGS=--upgrade"; \
	else echo "upgrade-check: the suite FAILS on the newest versions (pytest exit $$rc); keep the lock" >&2; fi; exit $$rc

# The benchmarks (bench/README.md), from this checkout: the suites' small --quick configurations
# (a few minutes); `make bench BENCH_ARGS=` for the full sizes. Results: bench_results/<suite>.json.
BENCH_SUITES ?= moe_layer training generation e2e
BENCH_ARGS ?= --quick
.PHONY: bench
bench: setup
	for suite in $(BENCH_SUITES); do $(PY) -m bench.$$suite $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) $(LMMS_VENV) $(UPGRADE_VENV) $(UPGRADE_VENV)-lmms .pytest_cache .ruff_cache
