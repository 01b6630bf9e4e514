"""One command-line vocabulary: the same flag, type and meaning for the same thing in every script;
former spellings only as aliases of the current ones."""

import argparse
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

import cli
import data
import distill
import eval_ppl
import expert_prune
import prune
import report
import run_paper
import sparse24
import zeroshot
from bench import forward, gpu_check, prune_memory, scale as bench_scale, sparse24_kernels

SCRIPTS = {"prune": prune, "distill": distill, "eval_ppl": eval_ppl, "expert_prune": expert_prune,
           "sparse24": sparse24, "run_paper": run_paper, "zeroshot": zeroshot, "bench.scale": bench_scale,
           "bench.sparse24_kernels": sparse24_kernels, "bench.gpu_check": gpu_check, "bench.forward": forward,
           "bench.prune_memory": prune_memory, "report": report}
FORMER = {"--samples": "--nsamples", "--data": None, "--r": "--keep-experts", "--max-windows": "--eval-windows",
          "--hidden": "--hidden-size", "--intermediate": "--intermediate-size", "--layers": "--num-hidden-layers",
          "--experts": "--num-local-experts", "--vocab": "--vocab-size", "--batch": "--batch-size"}


class Parsed(Exception):
    pass


def parser_of(module) -> argparse.ArgumentParser:
    """The parser a script's main() builds, caught at its parse_args."""
    caught = {}

    def parse(self, args=None, namespace=None):
        caught["p"] = self
        raise Parsed
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = parse
    try:
        module.main([])
    except Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return caught["p"]


PARSERS = {name: parser_of(m) for name, m in SCRIPTS.items()}


@pytest.mark.parametrize("name", SCRIPTS)
def test_former_spellings_are_only_aliases(name):
    for a in PARSERS[name]._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if a.option_strings and a.option_strings[0] in FORMER:
            raise AssertionError(f"{name}: {a.option_strings[0]} is the name of a flag, not an alias")
        for old in a.option_strings[1:]:
            assert old in FORMER and (FORMER[old] in (None, a.option_strings[0])), (name, a.option_strings)
            assert "also spelled" in a.help and old in a.help, (name, old)


def test_every_former_spelling_is_still_accepted():
    """A user's scripts may still spell a flag the old way: each former spelling works somewhere."""
    aliases = {old for p in PARSERS.values() for a in p._actions for old in a.option_strings[1:]}
    assert set(FORMER) <= aliases, sorted(set(FORMER) - aliases)


def test_one_flag_means_one_thing_with_one_type():
    """--device, --seed, --nsamples, --seqlen, --batch-size, --calib-data, --eval-data: the same
    argparse type (the same checks) in every script that has them."""
    types = {}
    for name, p in PARSERS.items():
        for a in p._actions:
            if a.option_strings and a.option_strings[0] in ("--device", "--seed", "--nsamples", "--seqlen",
                                                             "--batch-size", "--calib-data", "--eval-data"):
                types.setdefault(a.option_strings[0], {})[name] = a.type
    assert set(types["--device"].values()) == {cli.device}
    assert set(types["--seed"].values()) == {cli.nonnegative_int}
    assert set(types["--nsamples"].values()) == {cli.positive_int}
    assert set(types["--batch-size"].values()) == {cli.positive_int}
    assert set(types["--seqlen"].values()) == {cli.seqlen}
    assert set(types["--calib-data"]) >= {"prune", "expert_prune", "distill", "run_paper"}
    assert set(types["--eval-data"]) >= {"eval_ppl", "run_paper"}


def test_help_shows_every_default_and_choice(capsys):
    with pytest.raises(SystemExit):
        prune.main(["--help"])
    text = capsys.readouterr().out
    assert "{moe-pruner,wanda,sparsegpt,magnitude}" in text and "(default: 128)" in text
    assert "window offsets (default: 0)" in text  # a default of 0 is shown too
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_names_a_flag_and_its_former_spelling_then_its_value_once():
    """The same --help under every Python (3.13's argparse writes a value once, 3.10-3.12's after
    every spelling): docs/command-line.md holds it and is compared under each."""
    text = distill.build_parser().format_help()
    assert "  --nsamples, --samples NSAMPLES\n" in text and "  --seqlen SEQLEN " in text
    assert "NSAMPLES, --samples" not in text


PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:  # a benchmark, run as python -m bench.NAME
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    print("exit", e.code, "torch loaded" if "torch" in sys.modules else "no torch")
"""


BAD_VALUE = {"prune.py": "--seed", "distill.py": "--seed", "expert_prune.py": "--seed", "run_paper.py": "--seed",
             "pretrain_tiny.py": "--seed", "eval_ppl.py": "--batch-size", "zeroshot.py": "--batch-size",
             "sparse24.py": "--method", "bench.scale": "--nsamples", "bench.prune_memory": "--nsamples",
             "bench.forward": "--repeats", "bench.sparse24_kernels": "--iters", "bench.gpu_check": "--seconds",
             "bench.distributed": "--bogus-flag", "report.py": "--bogus-flag"}


@pytest.mark.parametrize("script", BAD_VALUE)
def test_help_and_bad_values_answer_before_torch_loads(script):
    """--help and a bad flag value are answered by the parser each script builds before its heavy
    imports, so they appear at once (torch's import alone takes about a second)."""
    for flags, code in ((["--help"], 0), ([BAD_VALUE[script], "x"], 2)):
        out = subprocess.run([sys.executable, "-c", PROBE, script, *flags], cwd=data.REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.stdout.splitlines()[-1] == f"exit {code} no torch", (flags, out.stdout[-300:], out.stderr[-300:])


def test_the_flag_table_is_true():
    """docs/command-line.md's table: every script marked 'x' in a row has every flag the row names."""
    text = open(f"{data.REPO}/docs/command-line.md").read()
    table = text[text.index("| flag | meaning |"):].split("\n\n")[0].strip().split("\n")
    scripts = [c.strip() for c in table[0].strip("|").split("|")][2:]
    rows = 0
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        flags = re.findall(r"`(--[a-z-]+)`", cells[0])
        for script, cell in zip(scripts, cells[2:]):
            if cell.startswith("x"):
                have = {o for a in PARSERS[script]._actions for o in a.option_strings}
                assert set(flags) <= have, (script, flags)
                rows += 1
    assert rows > 30


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_opens_with_the_scripts_docstring(name):
    p = parser_of(SCRIPTS[name])  # built here, not at collection: a test's own calls are what mutmut maps
    assert p.description == SCRIPTS[name].__doc__ and SCRIPTS[name].__doc__.strip()


LAUNCHERS = {"torchrun", "single", "run_script", "as_nobody"}  # the tests' helpers that start a script's process
DEVICE_SCRIPTS = ("prune.py", "distill.py", "expert_prune.py", "eval_ppl.py", "zeroshot.py")  # scripts with --device


def launches(tree: ast.Module, source: str):
    """(line, the source a launch's argv is built from) for every script a test file starts in
    another process: a call of a launcher helper, or a shell command naming a script with --device.
    The argv's source is the call itself, the assignments in its function of the names it uses and
    the module's functions it calls (an argv built by a helper such as prune_argv)."""
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    definitions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in LAUNCHERS] + [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Lambda)
        and any(isinstance(t, ast.Name) and t.id in LAUNCHERS for t in n.targets)]
    inside = {id(n) for d in definitions for n in ast.walk(d)}  # a launcher's own body starts what it is given
    seen = set()
    for scope in ast.walk(tree):
        if not isinstance(scope, ast.FunctionDef):
            continue
        assigned = {}
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    for name in ast.walk(t):
                        if isinstance(name, ast.Name):
                            assigned.setdefault(name.id, []).append(node)
        for call in ast.walk(scope):
            if not isinstance(call, ast.Call) or id(call) in inside or (call.lineno, call.col_offset) in seen:
                continue
            name = call.func.id if isinstance(call.func, ast.Name) else None
            spawn = isinstance(call.func, ast.Attribute) and ast.unparse(call.func) in ("subprocess.run",
                                                                                        "subprocess.Popen")
            if name not in LAUNCHERS and not spawn:
                continue
            nodes, parts = [call], []
            while nodes:  # the call, the assignments of the names it uses, theirs, and the functions called
                node = nodes.pop()
                parts.append(ast.get_source_segment(source, node))
                for n in ast.walk(node):
                    if isinstance(n, ast.Name):
                        nodes += [a for a in assigned.get(n.id, []) if a is not node and
                                  ast.get_source_segment(source, a) not in parts]
                    f = functions.get(n.func.id) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) else None
                    if f and f.name not in LAUNCHERS and ast.get_source_segment(source, f) not in parts:
                        nodes.append(f)
            text = "\n".join(parts)
            if spawn and not any(s in text for s in DEVICE_SCRIPTS):
                continue  # not one of the scripts (python -c, unshare's probe, ...)
            seen.add((call.lineno, call.col_offset))
            yield call.lineno, text


def test_every_script_a_test_starts_in_another_process_names_its_device():
    """On a GPU host a script's --device defaults to cuda (nccl and bfloat16 under torchrun): every
    test that starts one in a subprocess says --device (in-process runs see no GPU: conftest)."""
    found, missing = 0, []
    for path in sorted(glob.glob(os.path.join(data.REPO, "tests", "test_*.py"))):
        source = open(path).read()
        for line, argv_source in launches(ast.parse(source), source):
            found += 1
            if "--device" not in argv_source:
                missing.append(f"{os.path.basename(path)}:{line}")
    assert found >= 20 and not missing, missing
