"""The committed studies (docs/results/<study>/: matrix.json and the eval cells behind it) recompute:
every difference from the cells' per-record units, and every table docs/RESULTS.md quotes from them."""
from pathlib import Path

import pytest

from selfexplain.eval.audit import main as audit

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.parent for p in (ROOT / "docs" / "results").glob("*/matrix.json"))


def test_there_are_committed_studies():
    assert STUDIES, "docs/results holds no study (matrix.json and eval/)"


@pytest.mark.parametrize("folder", STUDIES, ids=lambda p: p.name)
def test_a_committed_study_recomputes_and_results_md_quotes_its_tables(folder, capsys):
    assert audit([str(folder)]) == 0
    out = capsys.readouterr().out
    assert ", 0 differ from the committed ones" in out
    quoted = (ROOT / "docs" / "RESULTS.md").read_text()
    tables = [line for line in out.splitlines() if line.startswith("| ")]
    assert tables and [line for line in tables if line not in quoted] == [], \
        f"docs/RESULTS.md quotes no table of {folder.name} as the audit prints it"


QUOTED_SEED_TABLES = {  # a study's seeds, and the arguments of each table docs/RESULTS.md quotes from them
    "study_patching_scale_seed*": [[], ["--every-control", "zero_vector,shuffled_vector", "--metric", "exact_match"]],
    "study_techniques_cpu*": [[]],
}


@pytest.mark.parametrize("pattern", QUOTED_SEED_TABLES)
def test_results_md_quotes_the_seeds_side_by_side_as_recomputed(pattern, capsys):
    from selfexplain.eval.seeds import main as seeds

    folders = sorted(str(p) for p in (ROOT / "docs" / "results").glob(pattern) if (p / "matrix.json").exists())
    assert folders, f"no committed study matches {pattern}"
    quoted = (ROOT / "docs" / "RESULTS.md").read_text()
    for args in QUOTED_SEED_TABLES[pattern]:
        seeds([*folders, *args])
        tables = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
        assert tables and [line for line in tables if line not in quoted] == [], \
            f"docs/RESULTS.md does not quote `python -m selfexplain.eval.seeds {pattern} {' '.join(args)}` as it prints"
