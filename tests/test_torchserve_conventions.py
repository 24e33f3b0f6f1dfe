"""The handler's TorchServe conventions (handler/torchserve.py): the version they were verified on is checked."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from handler.torchserve import VERIFIED_VERSION, check_version
from servers.torchserve import TorchServeProcess


def test_another_torchserve_version_is_a_warning_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="handler.torchserve"):
        assert not check_version("0.13.0")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert f"TorchServe 0.13.0: this handler relies on TorchServe {VERIFIED_VERSION}'s internals" in record.message


def test_the_installed_torchserve_is_the_verified_one(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="handler.torchserve"):
        assert check_version()
    assert [record.levelno for record in caplog.records] == [logging.INFO]


def test_workers_check_the_version_as_they_start(server: TorchServeProcess) -> None:
    log = (Path(server.log_dir) / "model_log.log").read_text()
    assert f"TorchServe {VERIFIED_VERSION}: the version this handler's TorchServe conventions were verified on" in log
