"""
Text, tokens and calibration windows: the one data module every script uses.

- The embedded corpus: the source files of CPython 3.11.7's standard library, shipped in
  corpus/ (corpus/README.md: provenance, PSF licence), so that every interpreter reads the same
  text. Split deterministically *by file* (SHA-1 of the path relative to the stdlib root) into
  train / calib / eval, so no file's text leaks across splits.
- The evaluation sample: fewer windows than the text has are always spread evenly over it
  (sample_windows), never its first ones.
- Other sources, in their original on-disk form: C4 shards (json or json.gz, one {"text": ...}
  per line), WikiText raw files (wiki.test.raw, wiki.valid.raw), any plain text file.
- A byte-level BPE tokenizer trained with `tokenizers` (for the embedded model) and the model's
  own tokenizer.json for everything else.
- Calibration windows as in Wanda/SparseGPT: nsamples random windows of seqlen tokens, seeded;
  or an int array [nsamples, seqlen] from a .npy file used verbatim, so that two implementations
  can be compared on identical calibration data.

References: Wanda (Sun et al. 2023, arXiv 2306.11695) and SparseGPT (Frantar & Alistarh 2023,
arXiv 2301.00774) calibration protocol; MoE-Pruner Section 4.1 (128 C4 sequences).
"""

import argparse
import gzip
import hashlib
import json
import lzma
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cli import EVAL_SAMPLE, REPO, UserError, shown_path
from outputs import OutputError, check_output_file, write_output_file
# The trained tiny Mixtral shipped with the repo (see pretrain_tiny.py); every script's default.
SHIPPED_MODEL = os.path.join(REPO, "models", "tiny-mixtral")
# The second shipped model: trained with the standard balancing weight from upcycling, its router
# decisive (pretrain_tiny.py's report.json beside it); for comparisons, never a default.
DECISIVE_MODEL = os.path.join(REPO, "models", "tiny-mixtral-decisive")
# The third: a fine-grained OLMoE (32 experts, top-8, gates not renormalised) upcycled from the second.
FINE_GRAINED_MODEL = os.path.join(REPO, "models", "tiny-olmoe")
# Where pretrain_tiny.py puts a model trained on this machine when no shipped one is present.
CACHE_MODEL = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                           "mini-moe-pruner", "tiny-mixtral")


class DataError(UserError):
    """Input text or tokens cannot be used; the message is one line naming the problem."""


def default_model_dir() -> str:
    """The embedded default: the shipped model, else one trained on this machine by pretrain_tiny.py."""
    for d in (SHIPPED_MODEL, CACHE_MODEL):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise DataError(f"no embedded model at {SHIPPED_MODEL} or {CACHE_MODEL}: run `python pretrain_tiny.py` "
                    f"to train one (about 15 minutes), or pass --model DIR")


# -----------------------------------------------------------------------------
# The embedded corpus: a snapshot of CPython 3.11.7's standard library, shipped in corpus/

# The one corpus every number of this project is measured on, whatever Python runs the scripts
# (each interpreter's own stdlib differs: 3.12 has no distutils, and many files changed).
CORPUS = "CPython 3.11.7 stdlib"
CORPUS_DIR = os.path.join(REPO, "corpus")
# Percent of files in each split, by a hash of the file's path: enough held-out text for
# calibration (89 files, 1154 windows of 512 tokens) and evaluation (83 files, 753 windows of 512)
# with 90% left to train on.
SPLITS = {"train": (0, 90), "calib": (90, 95), "eval": (95, 100)}
# SHA-256 of each shipped split file: a modified, truncated or regenerated snapshot is refused.
CORPUS_SHA256 = {
    "train": "f93e84896b67ceb0d67fe54a1ead4b139327d3a16b9768754fd1d749a24697b4",
    "calib": "4afa7014baf33980d0182486fb9421037916d65230647cac00fafe1508e364d2",
    "eval": "c1bb2678ebc05b05a67e725c9e28892d528332c331d4dd724a5787b693c36ddc",
}


def split_of(path: str) -> str:
    """The split of a stdlib file, by the SHA-1 of its path relative to the stdlib root ('/'-separated):
    deterministic, and no file's text is in two splits."""
    bucket = int(hashlib.sha1(path.encode()).hexdigest(), 16) % 100
    return next(s for s, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def corpus_file(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return os.path.join(CORPUS_DIR, f"stdlib-{split}.jsonl.xz")


def corpus_records(split: str) -> list:
    """The files of one split as [{"path": relative path, "text": its text}] in the order of a sorted
    walk of the stdlib (a folder's files, then its subfolders), read from the shipped snapshot and
    checked against its SHA-256."""
    fn = corpus_file(split)
    try:
        with open(fn, "rb") as f:
            packed = f.read()
    except OSError as e:
        raise DataError(f"{shown_path(fn)}: cannot read the shipped corpus ({e.strerror})") from None
    if hashlib.sha256(packed).hexdigest() != CORPUS_SHA256[split]:
        raise DataError(f"{shown_path(fn)}: not the shipped snapshot (its SHA-256 differs); restore it with git")
    return [json.loads(line) for line in lzma.decompress(packed).decode("utf-8").splitlines()]


def stdlib_paths(split: str) -> list:
    """The relative paths of one split's files, in corpus order."""
    return [r["path"] for r in corpus_records(split)]


def stdlib_texts(split: str) -> list:
    """The files of one split, in corpus order, one string each."""
    return [r["text"] for r in corpus_records(split)]


def stdlib_text(split: str) -> str:
    """One split of the stdlib as one string, files separated by a blank line."""
    return "\n\n".join(stdlib_texts(split))


def corpus_id() -> str:
    """Which corpus the embedded text is (recorded in reports); the same on every interpreter."""
    return CORPUS


def write_corpus(stdlib_root: str, out_dir: str, overwrite: bool = False) -> dict:
    """Build the snapshot from a standard library folder (CPython 3.11.7's reproduces the shipped
    files byte for byte): every .py file outside site-packages, read as UTF-8 with undecodable bytes
    replaced and newlines universal, one JSON line per file, xz-compressed per split. Returns
    {split: SHA-256}."""
    records = {s: [] for s in SPLITS}
    for dirpath, dirnames, filenames in os.walk(stdlib_root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, fn), stdlib_root).replace(os.sep, "/")
                with open(os.path.join(dirpath, fn), encoding="utf-8", errors="replace") as f:
                    records[split_of(rel)].append({"path": rel, "text": f.read()})
    if not records["eval"]:
        raise DataError(f"{stdlib_root}: no .py files (not a standard library folder)")
    os.makedirs(out_dir, exist_ok=True)
    outputs = {split: os.path.join(out_dir, os.path.basename(corpus_file(split))) for split in SPLITS}
    for path in outputs.values():  # all refused before any is written
        check_output_file(path, overwrite)
    digests = {}
    for split, recs in records.items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        # preset 9 | EXTREME: the smallest file (4.7 MB for all three splits); xz decompresses it in 0.3 s
        packed = lzma.compress(lines.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
        write_output_file(outputs[split], packed, overwrite)
        digests[split] = hashlib.sha256(packed).hexdigest()
    return digests


# -----------------------------------------------------------------------------
# Other text sources


def read_text(path: str) -> str:
    """A text file in its original form: C4 (json/jsonl[.gz]), WikiText raw, or plain text.

    WikiText: each line is a row as in the HF `wikitext` dataset (a non-blank line keeps its
    newline, a blank line becomes ""), and rows are joined with "\\n\\n", as the pruning
    literature's evaluation code does (`"\\n\\n".join(testdata["text"])`).
    """
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a text file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    name = os.path.basename(path)
    opener = gzip.open if name.endswith(".gz") else open
    stem = name[:-3] if name.endswith(".gz") else name
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem.endswith((".json", ".jsonl")):
                texts = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            texts.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataError(f"{path}:{n}: not a JSON line with a \"text\" field") from None
                return "\n\n".join(texts)
            if stem.startswith("wiki.") and stem.endswith(".raw"):
                return "\n\n".join(line if line.strip() else "" for line in f)
            return f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


# -----------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(model_dir: str) -> Tokenizer:
    fn = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(fn):
        raise DataError(f"{model_dir}: no tokenizer.json")
    try:
        return Tokenizer.from_file(fn)
    except Exception as e:  # tokenizers raises plain Exceptions for a file it cannot parse
        raise DataError(f"{fn}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None


def train_tokenizer(text_iter, vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation), trained with `tokenizers`; no special tokens
    are added to encoded text, so a window's tokens are the text's tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text_iter, trainer=trainer)
    return tok


def encode(tokenizer, text: str) -> np.ndarray:
    """The whole text as one int32 token array: Tokenizer.encode(text).ids, so a tokenizer that
    adds BOS adds it once."""
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int32)


# -----------------------------------------------------------------------------
# Windows


def calibration_windows(ids: np.ndarray, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda-style calibration: nsamples windows of seqlen tokens at seeded random offsets.
    Returns int64 [nsamples, seqlen]."""
    n = len(ids)
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    if n <= seqlen:
        raise DataError(f"calibration text has {n} tokens, fewer than one window of {seqlen + 1}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - seqlen, size=nsamples)  # [nsamples], start <= n - seqlen - 1
    return torch.from_numpy(np.stack([ids[s:s + seqlen] for s in starts]).astype(np.int64))


def eval_windows(ids: np.ndarray, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens covering the text; the tail shorter than a window
    is dropped (the pruning literature's protocol). Returns int64 [n_windows, seqlen]."""
    n = len(ids) // seqlen
    if n == 0:
        raise DataError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.from_numpy(ids[: n * seqlen].astype(np.int64).reshape(n, seqlen))  # [windows, seqlen]



def is_embedded(spec: str) -> bool:
    """Whether a --calib-data / --eval-data value names the embedded corpus ('stdlib' or 'stdlib:SPLIT')."""
    return spec in (None, "stdlib") or spec.startswith("stdlib:")


def input_path(spec: str):
    """The file or folder a --calib-data / --eval-data value names (None for the embedded corpus),
    so that no output replaces it."""
    return None if is_embedded(spec) else spec


def eval_window_count(spec: str, asked: int = None) -> int:
    """How many evaluation windows to use: as asked (0 = all); by default EVAL_SAMPLE of the embedded
    corpus and all of any other text (the literature's protocol evaluates every window)."""
    if asked is not None:
        return asked
    return EVAL_SAMPLE if is_embedded(spec) else 0


def sample_windows(windows: torch.Tensor, n: int) -> tuple:
    """n of the evaluation windows spread evenly over the whole text (window floor(i * N / n) for
    i < n), so that a sample represents every part of the held-out split rather than its first
    files; all windows when n is 0, None or at least N. The one rule of every script that evaluates
    on fewer than all windows. Returns (windows [n, seqlen], their indices)."""
    N = len(windows)
    if not n or n >= N:
        return windows, list(range(N))
    idx = [i * N // n for i in range(n)]  # strictly increasing, since N > n
    return windows[idx], idx


def load_token_file(path: str, vocab_size: int) -> torch.Tensor:
    """An int array [nsamples, seqlen] from a .npy file, checked and used verbatim."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":  # the .npy magic string
            raise DataError(f"{path}: not a .npy file (save token ids with numpy.save)")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a .npy array ({e})") from None
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 2:
        raise DataError(f"{path}: expected an int array [nsamples, seqlen], got shape {list(a.shape)}")
    if not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{path}: expected integer token ids, got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= vocab_size:
        raise DataError(f"{path}: token ids must lie in [0, {vocab_size}), found {a.min()}..{a.max()}")
    return torch.from_numpy(a.astype(np.int64))


def file_sha256(path: str) -> str:
    """A file's SHA-256, as `sha256sum` prints it: which calibration windows a run used."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def text_source(spec: str, split: str) -> str:
    """--calib-data / --eval-data: a path; 'stdlib' for the embedded corpus's `split` (the script's own:
    eval for evaluation, calib for calibration); 'stdlib:SPLIT' for a named split (train, calib, eval)."""
    if spec in (None, "stdlib"):
        return stdlib_text(split)
    if spec.startswith("stdlib:"):
        return stdlib_text(spec[len("stdlib:"):])  # corpus_file rejects an unknown split
    return read_text(spec)


def resolve_wikitext(spec: str, split: str) -> str:
    """A WikiText directory (wikitext-2-raw/) resolves to its wiki.test.raw or wiki.valid.raw."""
    if spec not in (None, "stdlib") and os.path.isdir(spec):
        fn = os.path.join(spec, {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}[split])
        if not os.path.isfile(fn):
            raise DataError(f"{spec}: no {os.path.basename(fn)} (a WikiText raw directory was expected)")
        return fn
    return spec


# -----------------------------------------------------------------------------
# Calibration tokens, the same for every script that needs them


def calibration_tokens(model_dir: str, vocab_size: int, max_positions: int, calib_data: str = "stdlib",
                       calib_tokens: str = None, nsamples: int = 128, seqlen: int = None, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids: verbatim from the .npy file calib_tokens, else nsamples random
    windows of calib_data tokenised with model_dir's tokenizer (seqlen default: 2048, the
    literature's, capped at max_positions)."""
    if calib_tokens:
        tokens = load_token_file(calib_tokens, vocab_size)
    else:
        seqlen = seqlen or min(2048, max_positions)
        ids = encode(load_tokenizer(model_dir), text_source(calib_data, "calib"))
        if len(ids) and ids.max() >= vocab_size:
            raise DataError(f"tokenizer produced id {ids.max()} >= vocab_size {vocab_size}")
        tokens = calibration_windows(ids, nsamples, seqlen, seed)
    if tokens.shape[1] > max_positions:
        raise DataError(f"calibration windows of {tokens.shape[1]} tokens exceed max_position_embeddings "
                        f"{max_positions}")
    return tokens


def main(argv=None):
    p = argparse.ArgumentParser(description="Rebuild the shipped corpus snapshot (corpus/) from a standard "
                                            "library folder, e.g. CPython 3.11.7's lib/python3.11, and print the "
                                            "SHA-256 of each split's file (CORPUS_SHA256 above).")
    p.add_argument("--stdlib", required=True, help="the standard library folder to read")
    p.add_argument("--out", default=CORPUS_DIR, help="folder for stdlib-{train,calib,eval}.jsonl.xz (default: corpus/)")
    p.add_argument("--overwrite", action="store_true", help="replace the files already in --out")
    a = p.parse_args(argv)
    try:
        for split, digest in write_corpus(a.stdlib, a.out, a.overwrite).items():
            print(f"{split}: {digest}")
    except (DataError, OutputError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
