"""The executor's spawned workers start multiprocessing's resource tracker, which lives as long as
the test process: start it before the first test, so no_leaks counts it as baseline."""
import multiprocessing.resource_tracker

multiprocessing.resource_tracker.ensure_running()
