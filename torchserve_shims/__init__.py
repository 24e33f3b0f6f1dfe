"""The runtime shims of TorchServe 0.12's Python workers: standard library only, shipped in every archive.

Each relies on TorchServe's internals (docs/torchserve-internals.md lists them, with the tests
that guard each). They run while a worker's interpreter starts, before it has imported anything
else, and in every Python process that has the archive on its path: so nothing here imports
more than the standard library (tests/test_worker_fork.py checks).

- ``sitecustomize.py``: the archive's start-up hook, copied to the archive's top level by
  ``model_archive/build.py`` (Python imports the first ``sitecustomize`` on its module path).
- ``worker_fork.py``: workers forked from a process that has imported torch and TorchRec once.
"""
