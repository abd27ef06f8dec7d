"""Workers start through multiprocessing's forkserver, which (with its resource tracker) lives as
long as the test process: start both before the first test, so no_leaks counts them as baseline."""

import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker

multiprocessing.get_context("forkserver").set_forkserver_preload(["shmhub.executor._worker", "numpy"])
multiprocessing.resource_tracker.ensure_running()
multiprocessing.forkserver.ensure_running()
