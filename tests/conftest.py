"""Shared test helpers: small random checkpoints written in the exact official layout, the
tolerance of float32 sums, and the CPU for every test but tests/test_devices.py."""

import itertools
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import checkpoint  # noqa: E402
import distill  # noqa: E402
import mini_mixtral as mm  # noqa: E402

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
             rope_theta=10000.0, torch_dtype="float32")

TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}" for i in range(400))


@pytest.fixture(autouse=True)
def on_the_cpu(request, monkeypatch):
    """Every test outside tests/test_devices.py runs on the CPU, on any host: torch.cuda.is_available()
    reads False for it, so every --device left at its default ('auto') means cpu, as in CI. The
    scripts a test starts in another process name --device themselves (test_vocabulary checks)."""
    if os.path.basename(str(request.path)) != "test_devices.py":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


U32 = 2.0 ** -24  # float32's unit roundoff


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, terms: int, what: str = ""):
    """actual and expected: one float32 computation whose sums ran in other orders (another torch
    build, thread count or split over ranks). A float32 sum of n terms is off by at most n x u
    (u = 2^-24) times the sum of its terms' magnitudes, in any order (Higham's gamma_n); an element
    near zero is a cancellation of larger terms, so the bound is taken relative to the tensor's
    largest |value|, with n the widest sum along the computation. Elementwise relative tolerances
    hold for one build's bits only."""
    bound = terms * U32 * expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= bound, f"{what}: max |difference| {diff:.3g} > {terms} x 2^-24 x max |expected| = {bound:.3g}"


def small_config(**overrides) -> mm.MixtralConfig:
    return mm.MixtralConfig(**{**SMALL, **overrides})


def random_model(seed=0, std=0.1, **overrides) -> mm.Mixtral:
    """std 0.1 rather than 0.02 so that routing and attention are far from uniform."""
    return mm.init_weights(mm.Mixtral(small_config(**overrides)), std=std, seed=seed).eval()


def write_checkpoint(path, model=None, dtype=None, max_shard_bytes=60_000, tokenizer=True, **overrides):
    """A random checkpoint, sharded (small shards) with an index unless max_shard_bytes is large."""
    model = model or random_model(**overrides)
    extra = {"tokenizer.json": small_tokenizer(model.config.vocab_size).to_str()} if tokenizer else None
    checkpoint.save_model(model, str(path), dtype=dtype, max_shard_bytes=max_shard_bytes, extra_files=extra)
    return str(path)


_TOKENIZERS = {}


def small_tokenizer(vocab_size):
    """A byte-level BPE trained on TEXT, whose ids all lie below vocab_size."""
    if vocab_size not in _TOKENIZERS:
        _TOKENIZERS[vocab_size] = data.train_tokenizer([TEXT], vocab_size)
    return _TOKENIZERS[vocab_size]


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "ckpt")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return str(p)


def script_error(capsys, main, argv, alone=True) -> str:
    """Run a script's main(argv) expecting the one-line error of cli.errors: a non-zero exit, no
    traceback, the last stderr line `error: ...` (and, when alone, nothing else on stderr).
    Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    lines = capsys.readouterr().err.strip().split("\n")
    assert lines[-1].startswith("error: ") and "Traceback" not in "\n".join(lines), lines
    if alone:
        assert len(lines) == 1, lines
    return lines[-1]


def stand_in_clock(monkeypatch, module):
    """module's time.time() reads 100 s at its first call (a run's start) and 1100 s at every later
    one, so each elapsed time a run logs or reports is 1000 s."""
    readings = itertools.chain([100.0], itertools.repeat(1100.0))
    monkeypatch.setattr(module, "time", types.SimpleNamespace(time=lambda: next(readings)))


def expert_mse(teacher_calls: dict, student_inputs: dict, student) -> torch.Tensor:
    """Eq. 10's expert term over a whole model, from distill.expert_term: the sum over layers and
    experts of MSE(teacher expert output, student expert output) on the tokens the teacher routed
    to each expert. teacher_calls: {layer: [ExpertCall]}; student_inputs: {layer: [N, hidden]}."""
    return sum(distill.expert_term(student.model.layers[l].block_sparse_moe.experts[c.expert], student_inputs[l], c,
                                   len(c.tokens)) for l, calls in teacher_calls.items() for c in calls)
