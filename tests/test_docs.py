"""The README's operator table is generated from the schemas (`mgc ops --markdown`) and must match them."""
from pathlib import Path

from mgc.opdocs import markdown_table, math_table

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_operator_table_matches_the_schemas():
    assert markdown_table() in README, "regenerate the README's operator table with `mgc ops --markdown`"


def test_readme_math_table_matches_the_operators():
    assert math_table() in README
