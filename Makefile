# Two entry points for a newcomer: `make demo` and `make test`. Both install what they need first
# (Debian packages, then a virtualenv with the project) and are safe to run again.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP_DEB  = $(VENV)/.debian-packages.stamp
STAMP_PY   = $(VENV)/.installed.stamp
PYTEST_ARGS ?=

.PHONY: all deps venv demo demo-migration test lint typecheck unit bench clean images

all: test

$(STAMP_DEB): deps/debian-packages.txt scripts/ensure-debian-packages.sh
	scripts/ensure-debian-packages.sh
	@mkdir -p $(VENV) && touch $@

$(STAMP_PY): pyproject.toml $(STAMP_DEB)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,verifier,host]'
	@touch $@

deps: $(STAMP_DEB)
venv: $(STAMP_PY)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

test: venv lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/python -m pytest tests/unit tests/vectors $(PYTEST_ARGS)

# The vm-tier test guest (vm_images/README.md); tests build it on demand through the same cache.
images: venv
	$(BIN)/python -m vm_images.build
disk-image: venv ; $(BIN)/python -m vm_images.disk

# The whole product on one machine with the embedded defaults (scripts/demo.py). The guest is
# the Debian disk image, built through its cache (first build ~100 s); the demo cleans up
# whatever it started. DEMO_ARGS="--guest initramfs" boots the small test initramfs instead.
demo: venv disk-image
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

# Issue 8's migration demo (scripts/demo_migration.py; root): two hosts on this machine, network
# namespaces demoA/demoB each with its own libvirtd and daemon, one registrar; the test initramfs
# guest migrates with its vAIK. Everything it started is stopped and the namespaces deleted.
demo-migration: venv images
	$(BIN)/python scripts/demo_migration.py $(DEMO_MIGRATION_ARGS)

# Every benchmark in bench/, each beside its baseline in the same run (none asserts a time).
# BENCH picks some, e.g. `make bench BENCH="bridge replay"`; the VM ones (bridge, which also
# times a guest's TPM through QEMU, save_restore, migrate) need root, QEMU and the cached guest
# image. ~15 min for all.
BENCH ?= replay memhash tpm_ops bridge attest save_restore migrate
bench: venv images
	set -e; for b in $(BENCH); do \
	  case $$b in bridge) args=--guest ;; *) args= ;; esac; \
	  echo "== bench/$$b.py $$args"; $(BIN)/python bench/$$b.py $$args; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
