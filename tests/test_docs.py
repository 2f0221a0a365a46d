"""The project's own docs hold what its code refers to."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_method_md_section_the_code_cites_is_in_docs_method_md():
    sections = set(re.findall(r"^## §(\d+) ", (REPO / "docs" / "method.md").read_text(), flags=re.MULTILINE))
    cited = {}
    for folder in ("method", "pipeline", "benchmarks", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for number in re.findall(r"method\.md §(\d+)", path.read_text()):
                cited.setdefault(number, path.relative_to(REPO))
    assert {"1", "2", "3", "4"} <= set(cited)  # the code does cite it
    missing = {number: str(path) for number, path in cited.items() if number not in sections}
    assert not missing, f"cited but not in docs/method.md: {missing}"
