# `make demo` and `make test` are all a fresh clone needs: both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py src/shmhub/_native.pyx src/shmhub/_atomics.h src/shmhub/layout.py
PYTEST_ARGS ?=

.PHONY: demo test test-slow asan bench clean

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

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m benchmarks

clean:
	rm -rf build $(VENV) .venv-asan src/*.egg-info src/shmhub/_native.c src/shmhub/_layout.h src/shmhub/*.so
