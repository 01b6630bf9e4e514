"""tests/mutation_score.py's kinds: a survivor is called help text, a progress line or a CUDA line
only when that is all it changes (development only: it reads mutmut's files, requirements-dev.txt)."""
import os

import pytest

pytest.importorskip("mutmut")
import mutation_score  # noqa: E402 (tests/ is on the path under pytest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def diff(old: str, new: str) -> str:
    return "--- a\n+++ b\n@@ -1,1 +1,1 @@\n" + "".join(f"-{l}\n" for l in old.split("\n")) + "".join(
        f"+{l}\n" for l in new.split("\n"))


@pytest.mark.parametrize("name, old, new, expected", [
    ("prune.x_build_parser__mutmut_1", '    p.add_argument("--x", type=int, default=8, help="windows per pass")',
     '    p.add_argument("--x", type=int, default=8, help="XXwindows per passXX")', "help"),
    ("prune.x_build_parser__mutmut_2", '                        "(default 0.08, the reference\'s)")',
     '                        "XX(default 0.08, the reference\'s)XX")', "help"),
    ("prune.x_build_parser__mutmut_3", "    p = cli.parser(__doc__)", "    p = cli.parser(None)", "help"),
    # a parser's default, type or choices is behaviour, not help text
    ("prune.x_build_parser__mutmut_4", '    p.add_argument("--x", type=int, default=8, help="windows per pass")',
     '    p.add_argument("--x", type=int, default=9, help="windows per pass")', "other"),
    ("prune.x_build_parser__mutmut_5", '    p.add_argument("--x", type=int, default=8,\n                   help="w")',
     '    p.add_argument("--x", type=int, help="w")', "other"),
    # a string in main is not help text: a user-facing error, a flag's name
    ("prune.x_main__mutmut_6", '            p.error("--method is required (or --recipe)")',
     '            p.error("XX--method is required (or --recipe)XX")', "other"),
    ("prune.x_main__mutmut_7", '                                  "seqlen", "seed"}:',
     '                                  "XXseqlenXX", "seed"}:', "other"),
])
def test_a_survivor_is_help_text_only_when_it_changes_only_what_help_shows(monkeypatch, name, old, new, expected):
    monkeypatch.chdir(REPO)  # the kinds read the module's source
    assert mutation_score.kind(name, diff(old, new)) == expected
