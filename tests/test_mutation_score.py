"""tests/mutation_score.py's kinds: a survivor is called help text or torchrun-only only when that
is all it changes (development only: it reads mutmut's files, requirements-dev.txt)."""
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
    # a change inside a distributed.* call is seen only under torchrun; beside one, it is not
    ("distill.x_gather_experts__mutmut_8", "            distributed.broadcast(p.data, e % distributed.world())",
     "            distributed.broadcast(p.data, e / distributed.world())", "distributed"),
    ("prune.x_prune_checkpoint__mutmut_9", "        x, pos = embed_windows(reader, distributed.share(tokens), dev, DTYPES[args.act_dtype])",
     "        x, pos = embed_windows(reader, distributed.share(tokens), dev, )", "other"),
    # a string in main is not help text: a user-facing error, a flag's name
    ("prune.x_main__mutmut_6", '            p.error("--method is required (or --recipe)")',
     '            p.error("XX--method is required (or --recipe)XX")', "other"),
    ("prune.x_main__mutmut_7", '                                  "seqlen", "seed"}:',
     '                                  "XXseqlenXX", "seed"}:', "other"),
])
def test_a_survivor_is_help_text_or_torchrun_only_when_that_is_all_it_changes(monkeypatch, name, old, new, expected):
    monkeypatch.chdir(REPO)  # the kinds read the module's source
    assert mutation_score.kind(name, diff(old, new)) == expected
