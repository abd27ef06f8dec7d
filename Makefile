# `make demo` and `make test` are all a fresh clone needs: both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py src/shmhub/_native.pyx src/shmhub/_atomics.h src/shmhub/layout.py
PYTEST_ARGS ?=

# ruff format is enforced on these files only: reformatting the rest would bury its history.
FORMATTED := src/shmhub/cli.py src/shmhub/monitor.py src/shmhub/top.py src/shmhub/prometheus.py \
	tests/unit/test_cli.py tests/link/test_top.py tests/link/test_stats.py tests/link/test_doc_examples.py tests/guests/top_hub.py
TYPED := src/shmhub/_native.pyi src/shmhub/rpc src/shmhub/remote src/shmhub/executor src/shmhub/http src/shmhub/cli.py src/shmhub/monitor.py src/shmhub/top.py src/shmhub/prometheus.py

.PHONY: demo test test-slow asan interleave crashpoints bench lint docs clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,numpy,http]'
	touch $@

demo: $(STAMP)
	$(PY) -m shmhub demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The unit tests against an AddressSanitizer build of the core, in a venv of its own.
asan:
	test -x .venv-asan/bin/python || $(PYTHON) -m venv .venv-asan
	rm -rf build
	SHMHUB_SANITIZE=address .venv-asan/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps .
	.venv-asan/bin/python -m pip install --quiet --disable-pip-version-check pytest pytest-timeout hypothesis numpy
	rm -rf build
	cd tests && LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		../.venv-asan/bin/python -m pytest -p no:cacheprovider -c ../pyproject.toml --rootdir .. unit $(PYTEST_ARGS)

# The kill-anywhere tests against a build with crash points (SHMHUB_CRASHPOINTS), in a venv of its own.
crashpoints:
	test -x .venv-crash/bin/python || $(PYTHON) -m venv .venv-crash
	rm -rf build
	SHMHUB_CRASHPOINTS=1 .venv-crash/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps .
	.venv-crash/bin/python -m pip install --quiet --disable-pip-version-check pytest pytest-timeout hypothesis numpy
	rm -rf build
	cd tests && ../.venv-crash/bin/python -m pytest -p no:cacheprovider -c ../pyproject.toml --rootdir .. crashpoints $(PYTEST_ARGS)

# Every interleaving of the ring, the pool and the waiter protocols at larger sizes (SPIN models in
# tests/interleave; the test suite checks the smallest sizes). Needs spin (apt-get install spin).
interleave: $(STAMP)
	$(PY) tests/interleave/test_interleave.py --full

$(VENV)/.lint-installed: $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,numpy,lint]'
	touch $@

# ruff (lint everywhere, format on FORMATTED) and mypy --strict on TYPED (the core's stub, rpc, the CLI); settings in pyproject.toml.
lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check $(FORMATTED)
	$(PY) -m mypy $(TYPED)

$(VENV)/.docs-installed: $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,numpy,docs]'
	touch $@

# The documentation site (mkdocs.yml) in site/; strict: a broken link or reference fails.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m benchmarks
	$(PY) -m benchmarks.http_bench
	$(PY) -m benchmarks.remote_bench

clean:
	rm -rf build site $(VENV) .venv-asan .venv-crash src/*.egg-info src/shmhub/_native.c src/shmhub/_layout.h src/shmhub/*.so
