"""The shared floor: scoped environment, store paths and error lines, each with one definition."""

from __future__ import annotations

import os

import pytest

from pipeline.runtime import absolute_store_uri, error_line, exception_line, scoped_env


def test_relative_stores_become_absolute_for_trials_that_run_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_store_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_store_uri("sqlite:///sub/m.db?timeout=5") == f"sqlite:///{tmp_path / 'sub' / 'm.db'}?timeout=5"
    assert absolute_store_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_store_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert absolute_store_uri("mlruns") == str(tmp_path / "mlruns")  # a plain path is a file store
    assert absolute_store_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_scoped_env_restores_what_was_there_and_lets_a_user_setting_win(monkeypatch):
    monkeypatch.setenv("IMBCIL_TEST_A", "user")
    monkeypatch.delenv("IMBCIL_TEST_B", raising=False)
    with scoped_env({"IMBCIL_TEST_A": "ours", "IMBCIL_TEST_B": "ours"}):
        assert (os.environ["IMBCIL_TEST_A"], os.environ["IMBCIL_TEST_B"]) == ("ours", "ours")
    assert os.environ["IMBCIL_TEST_A"] == "user" and "IMBCIL_TEST_B" not in os.environ
    with scoped_env({"IMBCIL_TEST_A": "ours", "IMBCIL_TEST_B": "ours"}, user_wins=True):
        assert (os.environ["IMBCIL_TEST_A"], os.environ["IMBCIL_TEST_B"]) == ("user", "ours")
    assert "IMBCIL_TEST_B" not in os.environ
    with pytest.raises(RuntimeError), scoped_env({"IMBCIL_TEST_B": "x"}):
        raise RuntimeError("restored on the way out too")
    assert "IMBCIL_TEST_B" not in os.environ


def test_error_line_takes_the_telling_line_of_a_traceback():
    traceback = "Traceback (most recent call last):\n  File 'x.py', line 1\n    boom()\nValueError: bad   value\n  (raised here)"
    assert error_line(traceback) == "ValueError: bad value"
    assert error_line("just a message\nand its last line") == "and its last line"
    assert error_line("") == ""
    long = "RuntimeError: " + "x" * 600
    assert len(error_line(long)) == 500 and error_line(long).endswith("...")
    assert exception_line(KeyError("k")) == "KeyError: 'k'" and exception_line(OSError()) == "OSError"
