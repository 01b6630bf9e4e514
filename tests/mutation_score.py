"""
The mutation score of the modules that implement the papers, from a finished `mutmut run`
(setup.cfg names the modules and the tests), written to results/mutation.json for
docs/testing.md: per module the mutants killed, surviving, not reached by any test and timed
out, and every survivor with its diff and its kind:

  - help:        the text of a --help (docs/command-line.md shows it; it changes no behaviour)
  - log:         the text of a progress line
  - device:      a device argument dropped or None, the same tensor on the CPU the tests run on
  - cuda:        a line that runs only with a CUDA GPU (the CPU tests check that it refuses)
  - distributed: a line that runs only under torchrun, or a change that only a run under
                 torchrun sees (tests/test_distributed.py runs those in subprocesses, which
                 mutmut's in-process run does not map to the functions they call)
  - equivalent:  judged one by one (EQUIVALENT below): no input can tell it from the original
  - other:       none is left unjudged; docs/testing.md says so

Development only (requirements-dev.txt): run from the repository root after mutmut,

    OMP_NUM_THREADS=1 PYTEST_ADDOPTS="-p tests.mutation_order -o tmp_path_retention_policy=none" \
        mutmut run --max-children 2
    python tests/mutation_score.py --json results/mutation.json --overwrite
"""

import configparser
import json
import os
import platform
import re
import sys
from importlib.metadata import version

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mutmut.mutation.diff_apply import get_diff_for_mutant  # noqa: E402 (after the path above)
from mutmut.stats import status_by_exit_code  # noqa: E402

import cli  # noqa: E402
from outputs import json_text, write_output_file  # noqa: E402

CUDA_ONLY = ("require_cuda", "to_semi_structured", "sparsify_experts", "compare_logits")
# mutmut's verdicts, as results/mutation.json names them (mutmut's own words, spaces as _)
STATUSES = ("mutants", *sorted({v.replace(" ", "_") for v in status_by_exit_code.values()} | {"suspicious"}))
KINDS = ("help", "log", "device", "cuda", "distributed", "equivalent", "other")
# (function, text of the mutated line, text of the mutant): why no input can tell them apart
EQUIVALENT = [
    ("", "shape[-1]", "shape[+1]", "on the 2-D tensors it is given, shape[1] is shape[-1]"),
    ("", 'float("-inf")', 'float("-INF")', "Python reads both as minus infinity"),
    ("owl_sparsities", "(d - d.min())", "(d + d.min())", "a constant shift, cancelled by the centring that follows"),
    ("", "stable=True", "stable=", "the scores sorted hold no ties on real inputs (floats from a forward pass)"),
    ("", "stable=True", "descending=True, )", "the scores sorted hold no ties on real inputs (floats from a forward pass)"),
    ("slice_experts", "bias=False", "bias=None", "None is false: no bias either way"),
    ("build_parser", 'dest="keep_experts"', '"--r", type=', "argparse names the destination after the first long flag"),
    ("build_parser", 'dest="keep_experts"', "dest=None", "argparse names the destination after the first long flag"),
    ("build_parser", "default=None,", "type=cli.positive_int, help=", "None is argparse's default"),
    ("slice_experts", 'device="meta"', "bias=False, ", "the new router's weight is replaced at once: 'meta' only spares "
                                                     "allocating it"),
    ("compressed_layout", "cols // ", "cols / ", "a float shape compares equal to the integer one"),
    ("SkippingMoeBlock", "[1.0, 0.0]", "[1.0, 1.0]", "a skipping token's second weight multiplies an assignment that is not run"),
    ("", "set_to_none=True", "set_to_none=", "a parameter outside the loss never gets a gradient to zero, and the others get "
                                             "a new one before each step: zeros or None step alike"),
    ("train_expert", "lr=cfg.lr,", ".parameters(), weight_decay", "the learning rate is set before every step"),
    ("distill_full", "lr=cfg.lr,", ".parameters(), weight_decay", "the learning rate is set before every step"),
    ("apply_masks", "grads=False", "grads=True", "with its gradient zeroed first, AdamW leaves a pruned weight exactly "
                                                "zero, so the masking after the step is a safeguard that changes nothing"),
    ("apply_masks", "if grads else", "or True", "with its gradient zeroed first, AdamW leaves a pruned weight exactly "
                                                "zero, so the masking after the step is a safeguard that changes nothing"),
    ("TeacherCalls", "+= len(c.tokens)", "= len(c.tokens)", "each expert is called once per layer and batch"),
    ("TeacherCalls", "dtype=torch.float32", "dtype=None", "float32 is torch's default dtype"),
    ("TeacherCalls", "dtype=torch.float32", "n_experts, device", "float32 is torch's default dtype"),
    ("CondensedMoeBlock", ".to(x.dtype)", ".to(None)", "out has x's dtype, and an in-place add casts to it"),
    ("skip_ratios", "), 2)", "), 3)", "g1 / g0 is a ratio of router probabilities, which renormalising over the top 3 "
                                      "instead of the top 2 does not change"),
    ("cd_moe", "batch_size: int = 8", "batch_size: int = 9", "the batch size changes only the order of float sums"),
    ("cd_moe", 'dtype: str = "float32"', 'dtype: str = "', "compute_dtype runs every dtype but bfloat16 in float32"),
    ("save_compressed", "check_output(out, overwrite, [model_dir])", "check_output(out,", "the CheckpointWriter that "
                                                                                    "follows checks the output again"),
    ("save_compressed", "CheckpointWriter(out, reader.config", "CheckpointWriter(out, None", "the config is set before "
                                                                                           "anything is written"),
    ("load_compressed", "continue", "break", "lm_head.weight, the only parameter it skips, is the last one"),
    ("storage_report", '"not a pruned matrix"', '"NOT A PRUNED MATRIX"', "only its being a reason matters: such a matrix "
                                                                        "is not recorded"),
    ("storage_report", '"not a pruned matrix"', '"XXnot a pruned matrixXX"', "only its being a reason matters: such a "
                                                                             "matrix is not recorded"),
    ("distill_checkpoint", "inputs=[teacher_dir])", "src_dir=student_dir, )", "check_output has refused an output that "
                                                                             "is or lies in the teacher before any work"),
    ("zero_masks", "dtype=torch.float64,", "dtype=None,", "only whether a count of zeros is positive matters, and "
                                                         "float32 keeps that"),
    ("zero_masks", "dtype=torch.float64,", 'masks.values()], device="cpu"))', "only whether a count of zeros is positive "
                                                                            "matters, and float32 keeps that"),
    ("prune_matrix", 'group: str = "row"', 'group: str = "XXrowXX"', "the group is compared with \"matrix\" alone"),
    ("prune_matrix", 'group: str = "row"', 'group: str = "ROW"', "the group is compared with \"matrix\" alone"),
    ("prune_checkpoint", "/ max(1, len(", "/ max(2, len(", "every layer prunes at least an expert's three matrices, so "
                                                          "the count is never 1"),
    ("dense_copy", "torch.equal(half.to(w.dtype), w)", "torch.equal(half.to(None), w)", "torch.equal compares values, "
                                                                                       "promoting bfloat16 as the cast does"),
    ("pruned_forward", "halves, act_dtype)", "halves, None)", "the attention halves are kept only with float32 activations "
                                                              "(only_experts_change), and the MoE half's output is float32 "
                                                              "already: its residual stream is"),
] + [("drop_experts", 'None if protocol == "layerwise"', after, "under the layerwise protocol x is x_dense: the target "
                                                               "taken from x_dense is the same one, computed once more")
     for after in ('(protocol == "layerwise") and False', '"XXlayerwiseXX"', '"LAYERWISE"')]
# (function, text of the mutated line, text of the mutant): a change that only a run under torchrun sees
DISTRIBUTED = [("distill_full", "lam * W * l_exp", "lam / W * l_exp"),  # W, the world size, is 1 in one process
               ("distill_full", "all_sum(ce.detach().clone()) / W", "all_sum(ce.detach().clone()) * W"),
               # in one process a cross-rank sum returns its input: summing or returning first is the same
               ("InputStatsǁreduce", "if not distributed.active():", "if distributed.active():"),
               # full KD's batch split over the ranks: every batch size divides over one process
               *[("distill_checkpoint", 'if mode == "full" and cfg.batch_size % distributed.world():', after)
                 for after in ('if mode != "full"', '"XXfullXX"', '"FULL"')],
               ("distill_checkpoint", 'raise data.DataError(f"--batch-size {cfg.batch_size} must be a multiple',
                "raise data.DataError(None)"),
               # main (rank 0) is True in one process: what the other ranks do is seen only under torchrun
               ("prune_checkpoint", "log = log if main else", "log = log if (main) or True else"),
               ("prune_checkpoint", "else (lambda m: None)", "else (lambda m: 0)"),
               ("prune_checkpoint", "src_dir=model_dir) if main else None", "src_dir=model_dir) if (main) or True else"),
               ("distill_checkpoint", "if distributed.is_main() else contextlib.nullcontext()",
                "if (distributed.is_main()) or True else"),
               ("distill_checkpoint", "if writer is not None and distributed.is_main():",
                "if writer is not None or distributed.is_main():"),
               ("distill_checkpoint", "writer if distributed.is_main()", "writer if (distributed.is_main()) or True")]



def changed_lines(diff: str) -> tuple:
    """The removed and the added lines of a unified diff, without their +/- marks."""
    lines = diff.splitlines()[2:]  # past the ---/+++ header
    return ([l[1:] for l in lines if l.startswith("-")], [l[1:] for l in lines if l.startswith("+")])


def only_on_cuda(name: str, line: str) -> bool:
    """Whether a line of the module lies inside an `if ... "cuda":` block (or uses a name bound
    only for one: the modules of load_compressed's CUDA branch)."""
    with open(name.split(".")[0] + ".py") as f:
        source = f.read().splitlines()
    if line not in source:
        return False
    i = source.index(line)
    indent = len(line) - len(line.lstrip())
    for above in reversed(source[:i]):
        depth = len(above) - len(above.lstrip())
        if above.strip() and depth < indent:
            if above.lstrip().startswith("if ") and ('"cuda"' in above or above.strip() == "if args.run:"):
                return True  # sparse24.py --run: refused before any work without CUDA
            if above.lstrip().startswith("def "):
                return "modules = dict(model.named_modules())" in line
            indent = depth
    return False


def source_lines(name: str) -> list:
    """The lines of the module a mutant belongs to, stripped (a method's diff comes dedented)."""
    with open(name.split(".")[0] + ".py") as f:
        return [l.strip() for l in f.read().splitlines()]


def in_log_call(name: str, line: str) -> bool:
    """Whether a line of the module continues a statement that a log( call opens (the call's
    parentheses still open on the lines above it)."""
    source = source_lines(name)
    if line.strip() not in source:
        return False
    i = source.index(line.strip())
    for j in range(i - 1, -1, -1):
        if re.match(r"log\(", source[j]):
            opened = "".join(source[j:i])
            return opened.count("(") > opened.count(")")
        if not re.match(r"(\+|f?\")", source[j]):  # not a continuation of string pieces
            return False
    return False


def only_under_torchrun(name: str, line: str) -> bool:
    """Whether a line of the module follows, in its function, an `if not distributed.active():
    return` (InputStats.reduce: a single process returns before it)."""
    source = source_lines(name)
    if line.strip() not in source:
        return False
    for j in range(source.index(line.strip()) - 1, -1, -1):
        if source[j].startswith("def "):
            return False
        if source[j] == "if not distributed.active():" and source[j + 1] == "return":
            return True
    return False


def only_help_text(name: str, removed: list, added: list) -> bool:
    """Whether a mutant of a parser changes only what --help shows: each changed line first differs
    inside a help= string, a string piece continuing one, or the parser's description (cli.parser)."""
    if "build_parser" not in name or len(removed) != len(added):
        return False
    for old, new in zip(removed, added):
        i = next((k for k, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        if not (re.match(r'\s*f?"', old) or re.search(r'\bhelp=f?"|_help = f?"|cli\.parser\(', old[:i])):
            return False
    return True


def inside_distributed_call(removed: list, added: list) -> bool:
    """Whether a mutant changes only the arguments of distributed.* calls (a broadcast's source
    rank, an all_sum's tensor), which in one process return their input or do nothing."""
    call = r"distributed\.\w+\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)"  # two levels of parentheses inside
    calls = lambda l: re.sub(call, "distributed.CALL", l)
    return len(removed) == len(added) and [calls(l) for l in removed] == [calls(l) for l in added]


def judged(name: str, removed: list, added: list) -> str:
    """EQUIVALENT's reason for this mutant, or None."""
    for function, before, after, why in EQUIVALENT:
        if function in name and any(before in l for l in removed) and any(after in l for l in added):
            return why
    return None


def kind(name: str, diff: str) -> str:
    """Which of KINDS a surviving mutant is, from its function's name and its diff."""
    removed, added = changed_lines(diff)
    if judged(name, removed, added):
        return "equivalent"
    text = " ".join(removed)
    without_device = lambda s: re.sub(r",?\s*device=[\w.\[\]\"']+|\.to\((device|None)\)|(\w+\.)?(device|dev)\b", "", s).replace(
        " ", "").replace(",,", ",").replace(",)", ")")
    if only_help_text(name, removed, added):
        return "help"
    if re.search(r"\blog\(", text) or all(in_log_call(name, l) for l in removed):
        return "log"
    if any(f"x_{f}__" in name for f in CUDA_ONLY) or '"cuda"' in text or all(only_on_cuda(name, l) for l in removed):
        return "cuda"
    if inside_distributed_call(removed, added) or all(only_under_torchrun(name, l) for l in removed) or any(
            function in name and any(before in l for l in removed) and any(after in l for l in added)
            for function, before, after in DISTRIBUTED):
        return "distributed"
    if [without_device(l) for l in removed] == [without_device(l) for l in added]:
        return "device"
    return "other"


def mutants(root: str) -> list:
    """[(name, status)] of every mutant of the modules setup.cfg mutates."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(root, "setup.cfg"))
    out = []
    for path in cfg["mutmut"]["source_paths"].split():
        with open(os.path.join(root, "mutants", path + ".meta")) as f:
            codes = json.load(f)["exit_code_by_key"]
        out += [(name, status_by_exit_code[code].replace(" ", "_")) for name, code in codes.items()]  # no_tests
    return out


def score(root: str) -> dict:
    rows = mutants(root)
    modules = {}
    for name, status in rows:
        counts = modules.setdefault(name.split(".")[0], dict.fromkeys(STATUSES, 0))  # by module name, e.g. "prune"
        counts["mutants"] += 1
        counts[status] += 1
        if status == "not_checked":  # by function, e.g. {"build_parser": 302}
            function = name.partition("__mutmut_")[0].split(".", 1)[1][2:].replace("\u01c1", ".").strip(".")
            by_function = counts.setdefault("not_checked_by_function", {})
            by_function[function] = by_function.get(function, 0) + 1
    for counts in modules.values():
        tested = counts["mutants"] - counts["no_tests"] - counts["not_checked"]
        counts["score"] = (counts["killed"] + counts["timeout"]) / tested if tested else None
    total = {k: sum(c[k] for c in modules.values()) for k in STATUSES}  # (not_checked_by_function stays per module)
    total["score"] = (total["killed"] + total["timeout"]) / (total["mutants"] - total["no_tests"] - total["not_checked"])
    survivors = []
    for name, status in rows:
        if status == "survived":
            diff = get_diff_for_mutant(name, path=name.split(".")[0] + ".py")
            removed, added = changed_lines(diff)
            survivors.append({"mutant": name, "kind": kind(name, diff), "why": judged(name, removed, added),
                              "diff": "\n".join(diff.splitlines()[2:])})
    total["survivors_by_kind"] = {k: sum(s["kind"] == k for s in survivors) for k in KINDS}
    return {"mutmut": version("mutmut"), "python": platform.python_version(), "modules": modules, "total": total,
            "survivors": survivors}


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--json", required=True, help="where to write the score (docs/testing.md quotes it)")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    args = p.parse_args(argv)
    with cli.errors():
        res = score(cli.REPO)
        write_output_file(args.json, json_text(res), args.overwrite)
        t = res["total"]
        print(f"{t['mutants']} mutants: {t['killed']} killed, {t['survived']} survived ({t['survivors_by_kind']}), "
              f"{t['no_tests']} not reached by a test; score {t['score']:.1%}")


if __name__ == "__main__":
    main()
