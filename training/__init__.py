"""Training DLRMs: the Criteo TSV reader, planted synthetic data and the TorchRec trainer.

Not shipped in model archives: a worker needs none of it. Models and their
preprocessing come from :mod:`model_factory`, shared with serving.
"""
