"""
Zero-shot accuracy through lm-eval, the metric of MoE-Pruner's main tables (Tables 3-4), on a
local multiple-choice task built from the embedded corpus's held-out split.

The paper's nine LM-Harness tasks (ARC, BoolQ, HellaSwag, MMLU, ...) are downloads the scripts do not
make, and they would say little about a 15M-parameter model of Python source. stdlib_nextline asks the
same kind of question of code: given up to 12 lines of a held-out file, which of 4 lines comes
next: the true one, or one of 3 lines drawn from other held-out files? lm-eval scores each choice
by its log-likelihood after the context (acc) and per byte (acc_norm); chance is 25%.

  - lm_eval_task/stdlib_nextline.jsonl: the items, built deterministically by `python zeroshot.py --build`
    (seeded; the embedded corpus's eval split of the running Python's stdlib);
  - lm_eval_task/stdlib_nextline.yaml: the lm-eval task;
  - `python zeroshot.py --model DIR [DIR ...]`: lm-eval's own `hf` model (transformers loads the
    official-layout checkpoints unchanged) on the task, one table.

lm-eval is an optional extra (`pip install -r requirements-eval.txt`); nothing else imports it.
On a machine that can download the paper's tasks:

    lm_eval --model hf --model_args pretrained=DIR,dtype=bfloat16 --batch_size 8 \\
        --tasks arc_easy,arc_challenge,boolq,hellaswag,mmlu,openbookqa,piqa,rte,winogrande
"""

import argparse
import importlib.util
import json
import os
import random

import cli


HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None

TASKS = os.path.join(cli.REPO, "lm_eval_task")  # the lm-eval task: its yaml and its items
TASK = "stdlib_nextline"
ITEMS = os.path.join(TASKS, TASK + ".jsonl")
CONTEXT_LINES = 12  # lines of context before the line to choose
N_ITEMS = 400  # a few hundred: the accuracy's standard error is about 2.5 points at 50%


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--build", action="store_true", help=f"(re)write {os.path.relpath(ITEMS, cli.REPO)} from the eval split")
    p.add_argument("--model", nargs="*", default=[], help="checkpoint directories to evaluate")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="lm-eval's batch size")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="evaluate only the first N items")
    p.add_argument("--json", help="write the results to this file")
    cli.add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace --json (and, with --build, the items file)")
    return p


cli.parse_first(__name__, build_parser)

import data
from checkpoint import CheckpointReader
from outputs import check_output_file, json_text, write_output_file

# lm-eval is an optional extra, imported where it is used: importing it takes seconds, and
# run_paper.py imports this module for its table alone


def usable(line: str) -> bool:
    """A line worth asking about: code, not blank, not a lone bracket, not too long for the context."""
    s = line.strip()
    return 8 <= len(s) <= 100 and not s.startswith("#")


def build_items(seed: int = 0, n_items: int = N_ITEMS) -> list:
    """The task's items from the eval split, deterministic for a seed and a stdlib."""
    rng = random.Random(seed)
    files = [t.split("\n") for t in data.stdlib_texts("eval")]
    pool = [(i, line) for i, lines in enumerate(files) for line in lines if usable(line)]
    candidates = [(i, j) for i, lines in enumerate(files) for j in range(CONTEXT_LINES, len(lines)) if usable(lines[j])]
    items = []
    for i, j in rng.sample(candidates, min(n_items, len(candidates))):
        lines = files[i]
        true = lines[j]
        distractors = []
        while len(distractors) < 3:
            k, line = rng.choice(pool)
            if k != i and line.strip() != true.strip() and line not in distractors:
                distractors.append(line)
        choices = distractors + [true]
        rng.shuffle(choices)
        items.append({"context": "\n".join(lines[j - CONTEXT_LINES:j]) + "\n", "choices": choices,
                      "label": choices.index(true)})
    return items


def read_items(path: str = None) -> list:
    """The task's items (default: ITEMS), each checked as lm-eval will read it: a JSON object a line
    with a "context" string, at least two distinct "choices" strings and a "label" indexing them."""
    path, items = path or ITEMS, []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise data.DataError(f"{path}: cannot read the task's items ({e})") from None
    for n, line in enumerate(lines, 1):
        where = f"{cli.shown_path(path)} line {n}"
        try:
            it = json.loads(line)
        except ValueError as e:
            raise data.DataError(f"{where}: not JSON ({e}); `python zeroshot.py --build --overwrite` rewrites the "
                                 f"items") from None
        choices = it.get("choices") if isinstance(it, dict) else None
        if not (isinstance(it, dict) and isinstance(it.get("context"), str) and isinstance(choices, list)
                and len(choices) >= 2 and all(isinstance(c, str) for c in choices) and len(set(choices)) == len(choices)
                and type(it.get("label")) is int and 0 <= it["label"] < len(choices)):
            raise data.DataError(f"{where}: an item needs a context string, two or more distinct choices and a label "
                                 f"among them; `python zeroshot.py --build --overwrite` rewrites the items")
        items.append(it)
    if not items:
        raise data.DataError(f"{path}: no items")
    return items


def evaluate(model_dir: str, batch_size: int = 8, limit: int = None, device: str = "cpu") -> dict:
    """lm-eval's hf model on stdlib_nextline: {"acc", "acc_stderr", "acc_norm", ...}."""
    if not HAVE_LM_EVAL:
        raise data.DataError("lm-eval is not installed: pip install -r requirements-eval.txt")
    import lm_eval
    from lm_eval.tasks import TaskManager
    config = CheckpointReader(model_dir).config  # an official-layout Mixtral, checked before lm-eval loads it
    # the token lm-eval puts before an empty context: BOS, else EOS (the embedded tokenizer has no BOS)
    prefix = config.extra.get("bos_token_id")
    prefix = config.extra.get("eos_token_id", 0) if prefix is None else prefix
    cwd = os.getcwd()
    os.chdir(cli.REPO)  # the task file names its items relative to the repository
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={os.path.join(cwd, model_dir)},dtype=float32,"
                                                             f"prefix_token_id={prefix}",
                                      tasks=[TASK], task_manager=TaskManager(include_path=TASKS),
                                      batch_size=batch_size, limit=limit, device=device, log_samples=False)
    finally:
        os.chdir(cwd)
    r = out["results"][TASK]
    return {"model": data.shown_path(model_dir), **{k.split(",")[0]: v for k, v in r.items() if "," in k}}


def markdown_table(rows: list) -> str:
    """evaluate()'s rows as one table: accuracy and length-normalised accuracy, +- lm-eval's standard errors."""
    out = ["| model | acc | acc_norm (per byte) |\n|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['acc']:.3f} +- {r['acc_stderr']:.3f} | "
                   f"{r['acc_norm']:.3f} +- {r.get('acc_norm_stderr', float('nan')):.3f} |")
    return "\n".join(out)


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    with cli.errors():
        if a.json:
            check_output_file(a.json, a.overwrite, a.model)
        if a.build:
            items = build_items()
            write_output_file(ITEMS, "".join(json.dumps(it) + "\n" for it in items), a.overwrite)
            print(f"wrote {len(items)} items to {os.path.relpath(ITEMS, cli.REPO)}")
        if a.model:
            read_items()  # the task file as lm-eval will read it, before any model loads
        rows = [evaluate(m, a.batch_size, a.limit, a.device) for m in a.model]
        if rows:
            print(markdown_table(rows))
        if a.json:
            write_output_file(a.json, json_text(rows), a.overwrite)
    return rows


if __name__ == "__main__":
    main()
