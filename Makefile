# `make demo` and `make test` are all a fresh clone needs: both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py src/shmhub/_native.pyx src/shmhub/_atomics.h src/shmhub/layout.py
PYTEST_ARGS ?=

TYPED := src/shmhub/_native.pyi src/shmhub/rpc src/shmhub/remote src/shmhub/executor src/shmhub/http src/shmhub/cli.py src/shmhub/monitor.py src/shmhub/top.py src/shmhub/prometheus.py \
	src/shmhub/__init__.py src/shmhub/host.py src/shmhub/guest.py src/shmhub/link.py src/shmhub/segment.py src/shmhub/errors.py \
	src/shmhub/layout.py src/shmhub/aio.py src/shmhub/codec.py src/shmhub/doorbell.py src/shmhub/peers.py src/shmhub/slots.py \
	src/shmhub/ring.py src/shmhub/bigmap.py src/shmhub/bootstrap.py

.PHONY: demo test test-slow asan ubsan tsan fuzz fuzz-merge interleave crashpoints bench lint docs clean

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

# A sanitizer build of the core in a venv of its own: $(1) the venv, $(2) SHMHUB_SANITIZE (setup.py).
define san_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	rm -rf build
	SHMHUB_SANITIZE=$(2) $(1)/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps .
	$(1)/bin/python -m pip install --quiet --disable-pip-version-check pytest pytest-timeout hypothesis numpy pyzmq
	rm -rf build
endef

# The unit tests and the fuzz corpus (replayed and mutated: hostile bytes) against an
# AddressSanitizer build of the core, in a venv of its own.
asan:
	$(call san_venv,.venv-asan,address)
	cd tests && PYTHONPATH=$(CURDIR) LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		../.venv-asan/bin/python -m pytest -p no:cacheprovider -c ../pyproject.toml --rootdir .. unit fuzz $(PYTEST_ARGS)

# The unit and stress tests and the fuzz corpus against an UndefinedBehaviorSanitizer build: any
# report aborts the test.
ubsan:
	$(call san_venv,.venv-ubsan,undefined)
	cd tests && PYTHONPATH=$(CURDIR) UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1 \
		../.venv-ubsan/bin/python -m pytest -p no:cacheprovider -c ../pyproject.toml --rootdir .. unit stress fuzz $(PYTEST_ARGS)

# The threaded tests against a ThreadSanitizer build (gcc's libtsan preloaded). CPython is not
# instrumented: TSan sees the core's accesses and the libc calls (memcpy, malloc, pthread) of both.
# Not ignore_noninstrumented_modules=1: it also hides the core's own memcpy races (the canary test in
# tests/stress/test_threads.py checks that a race is reported). Suppressions, explained: tests/tsan.supp.
TSAN_TESTS ?= stress/test_threads.py unit/test_slots.py unit/test_peers.py unit/test_ring.py
tsan:
	$(call san_venv,.venv-tsan,thread)
	cd tests && PYTHONPATH=$(CURDIR) LD_PRELOAD=$$(gcc -print-file-name=libtsan.so) \
		TSAN_OPTIONS="halt_on_error=1 abort_on_error=1 report_signal_unsafe=0 second_deadlock_stack=1 suppressions=$(CURDIR)/tests/tsan.supp" \
		../.venv-tsan/bin/python -m pytest -p no:cacheprovider -c ../pyproject.toml --rootdir .. $(TSAN_TESTS) $(PYTEST_ARGS)

# Coverage-guided fuzzing (atheris): FUZZ_RUNS inputs for each of FUZZ_TARGETS, one process each,
# starting from the committed corpus; new inputs and any crash-/timeout- artifact go to FUZZ_DIR.
# The default is 10^7 inputs in all. `make fuzz-merge` adds what reached new coverage to the corpus.
FUZZ_TARGETS ?= frame ring segment mmap_attach bootstrap_msgs rpc http_meta executor_fds array_payload remote_wire
FUZZ_RUNS ?= 1250000
FUZZ_DIR ?= .fuzz
FUZZ_OPTS ?= -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
fuzz: $(STAMP)
	mkdir -p $(FUZZ_DIR)
	rc=0; for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_DIR)/$$t; \
		PYTHONHASHSEED=0 $(PY) tests/fuzz/fuzz_run.py $$t -runs=$(FUZZ_RUNS) $(FUZZ_OPTS) -artifact_prefix=$(FUZZ_DIR)/$$t- \
			$(FUZZ_DIR)/$$t tests/fuzz/corpus/$$t > $(FUZZ_DIR)/$$t.log 2>&1 || rc=1; \
	done; $(PY) tests/fuzz/fuzz_report.py $(FUZZ_DIR) $(FUZZ_TARGETS); exit $$rc

fuzz-merge: $(STAMP)
	for t in $(FUZZ_TARGETS); do \
		PYTHONHASHSEED=0 $(PY) tests/fuzz/fuzz_run.py $$t -merge=1 tests/fuzz/corpus/$$t $(FUZZ_DIR)/$$t || exit 1; \
	done

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

# ruff (lint and format check, everywhere) and mypy --strict on TYPED (the core's stub, the public API, rpc, the CLI); settings in pyproject.toml.
lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
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
	$(PY) -m benchmarks.wake_bench

clean:
	rm -rf build site $(VENV) .venv-asan .venv-ubsan .venv-tsan .venv-crash .fuzz src/*.egg-info src/shmhub/_native.c src/shmhub/_layout.h src/shmhub/*.so
