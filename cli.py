"""
What every script's command line shares: argument types that refuse bad values before any work,
one-line errors, and signals handled like errors.

This module imports no torch, and each script builds its parser (`build_parser`) before its own
heavy imports: `--help` and a usage error are answered at once, before torch loads (about a
second on a small machine). A script's main() builds the same parser and runs its work inside
`with errors():`. Every problem a user can cause (a bad argument, a missing or unusable file, a
signal) then ends the script with a single line `error: ...` on stderr and a non-zero exit
status, never a traceback; the `with CheckpointWriter(...)` blocks inside have already removed
what the run had written. A bug still shows its traceback.
"""

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import threading

from outputs import OutputError, check_output_file, json_text, write_output_file

REPO = os.path.dirname(os.path.abspath(__file__))  # the repository root: models/, corpus/, results/
DTYPES = ("float32", "float16", "bfloat16")  # what --dtype accepts where a checkpoint is stored or read
COMPUTE_DTYPES = ("float32", "bfloat16")  # what --dtype accepts wherever a layer forward runs
METHODS = ("moe-pruner", "wanda", "sparsegpt", "magnitude")  # prune.py's scores (--method)
# Evaluation windows of the embedded corpus when none are asked for: 128 x 512 = 65k tokens, a
# sixth of the eval split, spread over all of it (a model's evaluation takes seconds, not minutes).
EVAL_SAMPLE = 128


class UserError(Exception):
    """A problem with what the user gave (a path, a file, a value): reported as one line naming it.
    DataError and CheckpointError are its kinds."""


def shown_path(path: str) -> str:
    """How reports and results name a path: relative to the repository when inside it (so results
    read the same on every machine), else as given."""
    if path is None:
        return None
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


class Terminated(BaseException):
    """SIGTERM (what kill, a scheduler or CI sends), raised like KeyboardInterrupt for SIGINT so
    that every `with` block on the way out cleans up. A BaseException, so no `except Exception`
    swallows it."""


def _terminate(signum, frame):
    raise Terminated()


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written; every flag's default shown after its help unless the help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if shown and "default" not in text and action.option_strings:  # `is`: a default of 0 is shown
            text += " (default: %(default)s)"
        return text

    def _format_action_invocation(self, action):
        # a flag and its former spellings, then its value once ("--nsamples, --samples NSAMPLES"), as
        # Python 3.13's argparse writes them and 3.10-3.12's do not: --help reads the same everywhere
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(action.option_strings) + " " + value


def parser(doc: str) -> argparse.ArgumentParser:
    """An argparse parser showing doc and every default in --help, whose usage errors are one
    `error:` line (exit 2)."""
    return _OneLineParser(description=doc, formatter_class=_HelpFormatter)


def number(cast, what: str, ok, rule: str):
    """An argparse type: cast the string (what it must be otherwise), then check it obeys rule."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{s} must be {rule}")
        return v
    return parse


positive_int = number(int, "an integer", lambda v: v >= 1, "at least 1")
nonnegative_int = number(int, "an integer", lambda v: v >= 0, "at least 0")
seqlen = number(int, "an integer", lambda v: v >= 2, "at least 2 (a window predicts its tokens 2..seqlen)")
positive_float = number(float, "a number", lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = number(float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
sparsity = number(float, "a number", lambda v: 0 <= v < 1, "a sparsity in [0, 1)")


def comma_list(item):
    """An argparse type: a comma list whose every value the type item parses and checks ("2,8" -> [2, 8])."""
    return lambda s: [item(v) for v in s.split(",")]


def device(s: str) -> str:
    """An argparse type: cpu, cuda or cuda:N, refused at once when torch cannot use it; 'auto' (the
    default) is cuda when torch sees one, else cpu."""
    import torch  # here, not at the top: parsing --help needs no torch (see the docstring above)
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", s)
    if m is None:
        raise argparse.ArgumentTypeError(f"{s!r}: expected cpu, cuda or cuda:N")
    if m.group(1) == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s}: torch sees no CUDA device")
    if m.group(1) == "cuda" and m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{s}: torch sees {torch.cuda.device_count()} CUDA devices")
    return s


def parse_first(module_name: str, build_parser):
    """A script's command line, answered before its heavy imports: run as __main__, --help and a usage
    error end it here, before torch loads (about a second); main() parses the same arguments again."""
    if module_name == "__main__":
        build_parser().parse_args()


def add_json_args(p: argparse.ArgumentParser):
    """--json and --overwrite of a benchmark: its figures as a results file, which docs quote."""
    p.add_argument("--json", help="also write every figure to this file (docs/benchmarks.md quotes it)")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")


def measure_and_save(measure, markdown, path: str = None, overwrite: bool = False) -> dict:
    """A benchmark's run: the --json path refused before any work, then measure(), markdown(results)
    printed and, with a path, the figures written there by the output rule. Returns the results."""
    if path:
        check_output_file(path, overwrite)
    results = measure()
    print(markdown(results))
    if path:
        write_output_file(path, json_text(results), overwrite)
    return results


def add_device_arg(p: argparse.ArgumentParser):
    """--device, the same in every script: cuda when torch sees one, else cpu."""
    p.add_argument("--device", type=device, default="auto",
                   help="where the model and activations live: cpu, cuda or cuda:N (default: cuda when torch sees "
                        "one, else cpu)")


def add_eval_windows_arg(p: argparse.ArgumentParser, former: tuple = ()):
    """--eval-windows, the evaluation sample (eval_ppl.py, run_paper.py; data.sample_windows draws it)."""
    p.add_argument("--eval-windows", *former, dest="eval_windows", type=nonnegative_int, default=None,
                   help=f"evaluation windows per model, spread evenly over the whole text; 0 = all. Default: "
                        f"{EVAL_SAMPLE} for the embedded corpus (the sample of README's tables, 65k tokens), all for "
                        f"any other text (the literature's protocol)" + spelled(former))


def add_recipe_arg(p: argparse.ArgumentParser, report: str, what: str = ""):
    """--recipe, a run's report to repeat (prune.py, expert_prune.py, distill.py); what: what it repeats."""
    article = "an" if report[0] in "aeiou" else "a"
    p.add_argument("--recipe", help=f"repeat the run {article} {report} records{f' ({what})' if what else ''}; flags given "
                                    f"as well override it")


def add_calib_data_arg(p: argparse.ArgumentParser, split: str = "calibration", former: tuple = ()):
    """--calib-data, the text windows are drawn from (prune.py, expert_prune.py, distill.py); former:
    its other spellings."""
    p.add_argument("--calib-data", *former, dest="calib_data", default="stdlib",
                   help=f"calibration text: a C4 json/json.gz shard, a WikiText raw file, any text file, or 'stdlib' "
                        f"for the embedded corpus's {split} split (default)" + spelled(former))


def spelled(former: tuple) -> str:
    """The --help note on a flag's other spellings (the names earlier versions gave it)."""
    return f"; also spelled {', '.join(former)}" if former else ""


def add_calibration_args(p: argparse.ArgumentParser, nsamples_help: str = "calibration windows (paper: 128)"):
    """The calibration flags of prune.py and expert_prune.py (data.calibration_tokens takes them)."""
    add_calib_data_arg(p)
    p.add_argument("--calib-tokens", help="an int .npy array [nsamples, seqlen] of token ids, used verbatim")
    p.add_argument("--nsamples", type=positive_int, default=128, help=nsamples_help)
    p.add_argument("--seqlen", type=seqlen, default=None,
                   help="tokens per window (default 2048 as in the paper's protocol, capped at the model's "
                        "max_position_embeddings: 512 for the embedded model)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the calibration window offsets")


def check_calibration_args(p: argparse.ArgumentParser, args: argparse.Namespace, argv):
    """--calib-tokens names the windows themselves: no --calib-data beside it, and no --nsamples,
    --seqlen or --seed, which it would ignore. A recipe's text or token file gives way to the other
    one given on the command line."""
    given = given_flags(p, argv)
    if "calib_tokens" in given and "calib_data" not in given:
        args.calib_data = "stdlib"
    if "calib_data" in given and "calib_tokens" not in given:
        args.calib_tokens = None
    if args.calib_tokens and args.calib_data != "stdlib":
        p.error("give --calib-data or --calib-tokens, not both")
    ignored = sorted(given & {"nsamples", "seqlen", "seed"})
    if args.calib_tokens and ignored:
        p.error(f"--calib-tokens fixes the windows: {', '.join('--' + k for k in ignored)} would be ignored")


def given_flags(p: argparse.ArgumentParser, argv) -> set:
    """The destinations of the flags actually given in argv (not left at their defaults)."""
    defaults = {a.dest: a.default for a in p._actions}
    try:
        for a in p._actions:
            a.default = argparse.SUPPRESS
        return set(vars(p.parse_args(argv)))
    finally:
        for a in p._actions:
            a.default = defaults[a.dest]


def apply_recipe(p: argparse.ArgumentParser, args: argparse.Namespace, argv, paths=(), renamed=None) -> dict:
    """--recipe REPORT: every argument the report recorded under "args" that argv does not give
    is taken from it, so the run repeats the recorded one; flags given next to --recipe override it.
    Relative paths in `paths` are read relative to the repository when they do not exist here.
    renamed maps an argument's former name, as older reports record it, to its name now.
    Returns {"from": report, "overridden": {flag: value}} for the new report (None without --recipe)."""
    if not getattr(args, "recipe", None):
        return None
    try:
        with open(args.recipe) as f:
            recorded = {(renamed or {}).get(k, k): v for k, v in json.load(f)["args"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # AttributeError: "args" not an object
        raise UserError(f"--recipe {args.recipe}: not a report with recorded arguments ({e})") from None
    given = given_flags(p, argv) - {"recipe"}
    actions = {a.dest: a for a in p._actions}
    for k, v in recorded.items():
        if k not in given and k in actions and k not in ("out", "overwrite", "recipe", "help"):
            v = recorded_value(actions[k], v, args.recipe)
            if k in paths and isinstance(v, str) and not os.path.exists(v) and os.path.exists(os.path.join(REPO, v)):
                v = os.path.join(REPO, v)
            setattr(args, k, v)
    return {"from": shown_path(args.recipe),
            "overridden": {k: getattr(args, k) for k in sorted(given) if k in recorded and recorded[k] != getattr(args, k)
                           and k not in ("out", "overwrite")}}


def recorded_value(action: argparse.Action, v, recipe: str):
    """A value a recipe records, passed through the checks its flag makes on the command line (its
    type and choices; a switch must be true or false), or one error line naming it."""
    flag = action.option_strings[0]
    try:
        if v is None:
            if action.default is not None:
                raise argparse.ArgumentTypeError("no value")
            return v
        if action.nargs == 0:  # a switch
            if not isinstance(v, bool):
                raise argparse.ArgumentTypeError("not true or false")
            return v
        if action.nargs in ("+", "*"):
            if not isinstance(v, list):
                raise argparse.ArgumentTypeError("not a list")
            return [recorded_value(argparse.Action([flag], action.dest, type=action.type, choices=action.choices), x,
                                   recipe) for x in v]
        if isinstance(v, (dict, list)) or (action.type is None and not isinstance(v, str)):
            raise argparse.ArgumentTypeError("not a value of this flag")
        if isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
            raise argparse.ArgumentTypeError("not a number")
        v = action.type(str(v)) if action.type else v
        if action.choices is not None and v not in action.choices:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(map(str, action.choices))}")
        return v
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise UserError(f"--recipe {recipe}: its {flag} {v!r}: {e}") from None


@contextlib.contextmanager
def errors(*more: type):
    """Turn the errors a user can cause (UserError with its kinds CheckpointError and DataError,
    OutputError, the types in `more`, an OS error on a path, SIGINT and SIGTERM) into one `error:` line and a non-zero exit."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except (UserError, OutputError, *more) as e:
        _fail(str(e), 1)
    except OSError as e:  # a path the user gave: permission, no space, read-only file system, ...
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}", 1)
    except KeyboardInterrupt:
        _fail("interrupted (SIGINT); no output was written", 128 + signal.SIGINT)
    except Terminated:
        _fail("terminated (SIGTERM); no output was written", 128 + signal.SIGTERM)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fail(message: str, status: int):
    print(f"error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr, flush=True)
    sys.exit(status)
