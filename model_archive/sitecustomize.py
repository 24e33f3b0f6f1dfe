"""The archive's start-up hook: Python imports ``sitecustomize`` while it starts, from the module path.

TorchServe puts the archive's directory on its workers' ``PYTHONPATH``, so this runs first in every
worker process of this model and lets the worker be forked from a process that has already imported
torch and TorchRec (``handler/worker_fork.py``); in any other process it does nothing.
"""

from handler.worker_fork import fork_if_worker

fork_if_worker()
