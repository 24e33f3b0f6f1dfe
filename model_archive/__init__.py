"""TorchServe model archives of the DLRM: build one (``build.py``) and read one, zipped or not (``contents.py``)."""
