"""
A pytest plugin for mutation runs: each mutant's tests run fastest first, by the durations mutmut
measured (mutants/mutmut-stats.json), so that a mutant is killed by its quickest failing test.
Which tests run, and so every verdict, stays mutmut's; only their order changes (pytest's -x
stops at the first failure, and a help-text mutant of prune.py is otherwise found, on average,
half-way through the hundred tests that call its parser).

Development only (docs/testing.md), from the repository root:

    OMP_NUM_THREADS=1 PYTEST_ADDOPTS="-p tests.mutation_order -o tmp_path_retention_policy=none" \
        mutmut run --max-children 2
"""

import json


def pytest_collection_modifyitems(session, config, items):
    try:  # mutmut runs the tests inside mutants/, beside its statistics
        with open("mutmut-stats.json") as f:
            durations = json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return  # not a mutation run: pytest's order
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))  # stable: ties keep pytest's order
