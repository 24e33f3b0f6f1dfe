"""The archive's start-up hook: Python imports ``sitecustomize`` while it starts, from the module path.

``model_archive/build.py`` puts this file at the archive's top level. TorchServe puts the archive's
directory on its workers' ``PYTHONPATH``, so this runs first in every worker process of this model
and lets the worker be forked from a process that has already imported torch and TorchRec
(:mod:`torchserve_shims.worker_fork`); in any other process it does nothing.

Python imports only the first ``sitecustomize`` it finds, and ``PYTHONPATH`` comes before the
standard library and site-packages: in a process with the archive on its path, this one hides any
other ``sitecustomize`` (a distribution's, a virtual environment's), which then does not run.
"""

from torchserve_shims.worker_fork import fork_if_worker

fork_if_worker()
