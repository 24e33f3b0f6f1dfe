"""DLRM model factory: typed configs, presets, model construction and artifacts.

Everything here is plain PyTorch/TorchRec code with no TorchServe dependency, so
the trainer, ``build_mar.py``, the handler and the tests all share it.
"""
