"""Packaging metadata: license file, typing marker, classifiers."""

from pathlib import Path

import pytest

import eqx_flexattn


REPO = Path(__file__).resolve().parent.parent


def test_license_typing_marker_and_metadata():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    license_text = (REPO / "LICENSE").read_text()
    assert project["license"] == {"text": "Apache-2.0"}
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
    classifiers = project["classifiers"]
    assert "License :: OSI Approved :: Apache Software License" in classifiers
    assert "Typing :: Typed" in classifiers
    assert (Path(eqx_flexattn.__file__).parent / "py.typed").exists()
    assert project["urls"]
    assert "pytest-xdist>=3.5" in project["optional-dependencies"]["test"]
