"""Imported first in the forkserver's template process (Executor, forkserver context): gives it
the program's sys.path and main module, which multiprocessing means to do and does not.

multiprocessing.forkserver.main() takes `sys_path` and `main_path` and uses neither (3.10 to
3.13): its parent never sends a `main_path` (the preparation data calls it
`init_main_from_path`), and `sys_path` is not applied. So a preloaded module that lives beside
the program's script is silently not preloaded, and every new worker runs the program's main
module again (runpy: compile and execute it, and import whatever it imports that the template
lacks), 8 ms of a 14 ms worker start with a main that imports `statistics`. Here the template
imports it once, as `__mp_main__`, the way each worker would; a worker then finds it in place
and skips it (multiprocessing.spawn._fixup_main_from_path / _from_name). If it fails here the
workers run it themselves, as before.

The parent passes what it would send a spawned child in MAIN_ENV, set only while the forkserver
starts (start_template)."""

from __future__ import annotations

import json
import os
import sys

MAIN_ENV = "_SHMHUB_FORKSERVER_MAIN"


def start_template() -> None:
    """Start the forkserver now (if it is not running), passing it this program's sys.path and
    main module. In the parent."""
    from multiprocessing import forkserver, spawn

    fs = forkserver._forkserver
    if getattr(fs, "_forkserver_pid", None) is not None:
        return  # running already: its template is what it is
    data = spawn.get_preparation_data("shmhub-template")
    main = {k: data[k] for k in ("init_main_from_path", "init_main_from_name") if k in data}
    os.environ[MAIN_ENV] = json.dumps({"sys_path": data.get("sys_path", sys.path), **main})
    try:
        fs.ensure_running()
    finally:
        os.environ.pop(MAIN_ENV, None)


def _adopt() -> None:
    raw = os.environ.pop(MAIN_ENV, None)
    if raw is None:
        return
    try:
        data = json.loads(raw)
        sys.path[:] = data["sys_path"]
        from multiprocessing import process, spawn

        path, name = data.get("init_main_from_path"), data.get("init_main_from_name")
        if path is None and (name is None or name == "__main__" or name.endswith(".__main__")):
            return  # nothing a worker would run either (-c, a `python -m pkg` main)
        process.current_process()._inheriting = True  # type: ignore[attr-defined]  # as spawn._main: no Process.start() in it
        try:
            if path is not None:
                spawn.import_main_path(path)
            else:
                spawn._fixup_main_from_name(name)  # type: ignore[attr-defined]
        finally:
            del process.current_process()._inheriting  # type: ignore[attr-defined]
    except BaseException:  # e.g. the main module fails outside its __main__ guard: workers run it themselves
        pass


_adopt()
