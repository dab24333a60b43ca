"""Files shipped inside the package (batchflip.bundled) and the code that reads them."""

from __future__ import annotations

import fnmatch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pandas as pd
import pytest
from conftest import ROOT

from batchflip import adjudication, bundled, scoring
from batchflip.errors import BatchflipError

DATA = ROOT / "src" / "batchflip" / "data"


def test_every_bundled_name_is_a_file_of_the_package_data_folder():
    for name in bundled.BUNDLED:
        assert bundled.bundled_path(name) == DATA / name and (DATA / name).is_file()
    on_disk = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file()}
    assert on_disk == set(bundled.BUNDLED)  # nothing shipped that the package does not name


def test_pyproject_ships_every_bundled_file_as_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["batchflip"]
    for name in bundled.BUNDLED:
        assert any(fnmatch.fnmatch(f"data/{name}", g) for g in globs), name


def test_unknown_name_is_an_error_listing_the_bundled_files():
    with pytest.raises(BatchflipError, match="not a bundled file.*refusal_patterns"):
        bundled.bundled_path("scorers/nope.yaml")


def test_shown_names_bundled_files_inside_the_package_only(tmp_path):
    assert bundled.shown(DATA / bundled.PUBLISHED) == "batchflip/data/fidelity/published.yaml"
    assert bundled.shown(tmp_path / "published.yaml") is None


def test_scorer_and_adjudication_default_to_the_bundled_files():
    text = pd.Series(["I can\u2019t help with that.", "Sure, here is how."])
    default = scoring.score_refusal(text, 2)
    given = scoring.score_refusal(text, 2, str(DATA / "scorers/refusal_patterns.yaml"))
    assert default[1].tolist() == given[1].tolist() == ["refused", "complied"]
    validator = adjudication.load_schema(None)
    assert validator.schema["title"] == "adjudication sheet row"


def test_a_given_schema_file_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(BatchflipError, match="schema file not found"):
        adjudication.load_schema(tmp_path / "nope.yaml")
