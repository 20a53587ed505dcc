"""README's family support table is the one built from the adapters and the test models, not kept by hand."""

from eemllm_models.families import FAMILIES
from support_table import README, readme_section, table


def test_readme_support_table_is_the_generated_one():
    generated = table()
    assert readme_section(README.read_text()) == generated, (
        "README.md's support table is out of date: run python tests/support_table.py --write")


def test_every_family_is_in_the_table_and_run_by_the_tests():
    rows = [line for line in table().splitlines() if line.startswith("| ") and not line.startswith(("| family", "| ---"))]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [family.name for family in FAMILIES]
    assert not any(row.endswith("| no | no |") for row in rows), "a family no test model runs"
