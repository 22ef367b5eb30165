"""The versions written beside every result: the code that runs, not what an install once recorded."""

import sys
import types

import peft_loraprune
from peft_loraprune.hub.versions import library_version, library_versions


def test_an_imported_modules_version_wins_over_stale_install_metadata(monkeypatch):
    """An editable install keeps the version it was installed at; results must name the code that ran."""
    monkeypatch.setattr(peft_loraprune, "__version__", "9.9.9")
    assert library_version("peft_loraprune") == "9.9.9"
    assert library_versions()["peft_loraprune"] == "9.9.9"


def test_a_source_checkout_without_metadata_and_a_missing_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "only_on_pythonpath", types.SimpleNamespace(__version__="1.2.3"))
    assert library_version("only-on-pythonpath") == "1.2.3"  # dashes in distribution names, underscores in modules
    assert library_version("no-such-library-anywhere") == "not installed"
