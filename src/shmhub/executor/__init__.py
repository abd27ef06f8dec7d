"""shmhub.Executor: a concurrent.futures process pool on the hub (docs/executor.md).

    with shmhub.Executor(max_workers=4) as ex:
        assert ex.submit(pow, 2, 10).result() == 1024

A worker that dies fails only the task it was running (WorkerCrashed); options(timeout=...) stops
a task that runs too long; arrays from ex.empty() reach any worker without a copy."""

from ..errors import ExecutorBroken, ExecutorError, TaskStopped, TaskTimeout, WorkerCrashed
from ._executor import Executor, TaskOptions

__all__ = ["Executor", "ExecutorBroken", "ExecutorError", "TaskOptions", "TaskStopped", "TaskTimeout", "WorkerCrashed"]
