"""Every script on every device torch sees.

Two checks of one promise, that every tensor a script creates lives on the device of the data it
meets (a tensor made on the CPU and met by CUDA data stops a GPU run at its first use):

  - without a GPU: each script runs with torch's default device set to 'meta' (tensors without
    data), under a mode that raises as soon as an operation meets a 'meta' tensor and a real one.
    A tensor created without naming its device lands on 'meta', so a run completes only when every
    tensor it creates names its device, as its data's or deliberately the CPU's (the small sums
    that travel through gloo under torchrun). In-place operations are checked too (torch itself
    lets `cpu_tensor += meta_tensor` pass silently).
  - with a GPU: each method runs on CUDA and on the CPU from the same checkpoint and calibration
    windows, and the results agree: masks equal up to a stated fraction where float order differs.
    On a machine without CUDA these cases skip, saying so.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import checkpoint
import distill
import eval_ppl
import expert_prune
import prune
import sparse24
from conftest import TEXT, write_checkpoint

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device: the CUDA runs are skipped (the device "
                                                  "discipline is still checked on the CPU by the 'meta' cases)")


class MetaMeetsReal(TorchFunctionMode):
    """Raises when one operation's tensors are on 'meta' and on a real device at once (but for
    torch's own check, in Module.to_empty, that a module built on 'meta' may take new tensors)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._has_compatible_shallow_copy_type:
            return func(*args, **kwargs)
        devices = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        if "meta" in devices and len(devices) > 1:
            raise AssertionError(f"{getattr(func, '__name__', func)}: a tensor created without a device meets "
                                 f"one on {', '.join(sorted(devices - {'meta'}))}")
        return func(*args, **kwargs)


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return write_checkpoint(tmp_path / "ckpt"), str(text)


def prune_argv(ckpt, text, out, *extra, device="cpu"):
    return ["--model", ckpt, "--calib-data", text, "--nsamples", "8", "--seqlen", "32", "--device", device,
            "--out", out, *extra]


PRUNE_CASES = {
    "moe-pruner": ["--method", "moe-pruner"],
    "wanda-2:4": ["--method", "wanda", "--nm", "2:4"],
    "sparsegpt": ["--method", "sparsegpt"],
    "magnitude": ["--method", "magnitude"],
    "owl-attention-router": ["--method", "moe-pruner", "--layer-sparsity", "owl", "--owl-lambda", "0.05",
                             "--prune-attention", "--prune-router"],
    "wanda-all-tokens-bf16": ["--method", "wanda", "--stats-tokens", "all", "--act-dtype", "bfloat16"],
}


@pytest.mark.parametrize("case", PRUNE_CASES)
def test_prune_creates_no_tensor_off_its_data(tmp_path, files, case):
    ckpt, text = files
    with torch.device("meta"), MetaMeetsReal():
        report = prune.main(prune_argv(ckpt, text, str(tmp_path / "out"), *PRUNE_CASES[case]))
    assert report["expert_sparsity"] > 0.4


EXPERT_CASES = {"naee": ["--keep-experts", "2"], "naee-skip": ["--keep-experts", "3", "--skip"], "reap": ["--keep-experts", "2", "--select", "reap"],
                "cd-moe": ["--condense-layers", "1", "--condense-experts", "2"]}


@pytest.mark.parametrize("case", EXPERT_CASES)
def test_expert_prune_creates_no_tensor_off_its_data(tmp_path, files, case):
    ckpt, text = files
    with torch.device("meta"), MetaMeetsReal():
        expert_prune.main(["--model", ckpt, *EXPERT_CASES[case], "--calib-data", text, "--nsamples", "4",
                           "--seqlen", "32", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert os.path.isfile(tmp_path / "out" / "config.json")


@pytest.mark.parametrize("mode", ["full", "per-expert"])
def test_distill_and_eval_create_no_tensor_off_their_data(tmp_path, files, mode):
    ckpt, text = files
    student = str(tmp_path / "student")
    prune.main(prune_argv(ckpt, text, student, "--method", "moe-pruner"))
    with torch.device("meta"), MetaMeetsReal():
        distill.main(["--teacher", ckpt, "--student", student, "--calib-data", text, "--out", str(tmp_path / "kd"),
                      "--mode", mode, "--nsamples", "8", "--seqlen", "32", "--epochs", "1", "--batch-size", "4",
                      "--device", "cpu"])
        res = eval_ppl.main(["--model", str(tmp_path / "kd"), "--eval-data", text, "--seqlen", "32", "--router-stats",
                             "--device", "cpu"])
    assert 1 < res[0]["ppl"] < 1e4


# -----------------------------------------------------------------------------
# The same runs on CUDA, against the CPU


MASK_AGREEMENT = 0.995  # a GPU's float order moves scores by ~1e-7 relative: only near-ties may flip


def weights(path) -> dict:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@needs_cuda
@pytest.mark.parametrize("case", PRUNE_CASES)
def test_prune_on_cuda_matches_the_cpu(tmp_path, files, case):
    ckpt, text = files
    runs = {d: prune.main(prune_argv(ckpt, text, str(tmp_path / d), *PRUNE_CASES[case], device=d))
            for d in ("cpu", "cuda")}
    cpu, gpu = weights(tmp_path / "cpu"), weights(tmp_path / "cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        same = ((cpu[name] == 0) == (gpu[name] == 0)).float().mean().item()
        assert same >= (1.0 if case == "magnitude" else MASK_AGREEMENT), (name, same)
        if "sparsegpt" not in case:  # the kept weights are the dense ones, bitwise
            kept = (cpu[name] != 0) & (gpu[name] != 0)
            assert torch.equal(cpu[name][kept], gpu[name][kept]), name
    for cpu_l, gpu_l in zip(runs["cpu"]["routed_tokens_per_expert"], runs["cuda"]["routed_tokens_per_expert"]):
        assert sum(cpu_l) == sum(gpu_l) and max(abs(c - g) for c, g in zip(cpu_l, gpu_l)) <= 2  # near-ties may flip
    for d in ("cpu", "cuda"):
        assert json.load(open(tmp_path / d / "prune_report.json"))["args"]["device"] == d


def same_numbers(a, b, rel=1e-4) -> bool:
    """a == b, but floats (NAEE's skipping betas, CD-MoE's weights: sums in another order on a GPU)
    within rel of each other."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == pytest.approx(b, rel=rel, abs=1e-6)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_numbers(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_numbers(x, y, rel) for x, y in zip(a, b))
    return a == b


@needs_cuda
@pytest.mark.parametrize("case", EXPERT_CASES)
def test_expert_prune_on_cuda_matches_the_cpu(tmp_path, files, case):
    ckpt, text = files
    reps = {d: expert_prune.main(["--model", ckpt, *EXPERT_CASES[case], "--calib-data", text, "--nsamples", "4",
                                  "--seqlen", "32", "--device", d, "--out", str(tmp_path / d)]) for d in ("cpu", "cuda")}
    cpu, gpu = weights(tmp_path / "cpu"), weights(tmp_path / "cuda")
    assert cpu.keys() == gpu.keys()
    for k in cpu:  # the same experts kept; CD-MoE's condensed experts are trained, so GPU float order shows
        assert torch.equal(cpu[k], gpu[k]) if case != "cd-moe" else \
            (cpu[k] - gpu[k]).abs().max() <= 1e-3 * cpu[k].abs().max(), k
    assert same_numbers(json.load(open(tmp_path / "cpu" / "config.json")), json.load(open(tmp_path / "cuda" / "config.json")))
    assert reps["cpu"].keys() == reps["cuda"].keys()


@needs_cuda
def test_distill_and_eval_on_cuda_match_the_cpu(tmp_path, files):
    ckpt, text = files
    student = str(tmp_path / "student")
    prune.main(prune_argv(ckpt, text, student, "--method", "moe-pruner"))
    ppl = {}
    for d in ("cpu", "cuda"):
        distill.main(["--teacher", ckpt, "--student", student, "--calib-data", text, "--out", str(tmp_path / f"kd-{d}"),
                      "--nsamples", "8", "--seqlen", "32", "--epochs", "1", "--batch-size", "4", "--device", d])
        ppl[d] = [r["ppl"] for r in eval_ppl.main(["--model", ckpt, str(tmp_path / f"kd-{d}"), "--eval-data", text,
                                                    "--seqlen", "32", "--device", d])]
    assert ppl["cpu"][0] == pytest.approx(ppl["cuda"][0], rel=1e-4)  # the dense model: float order only
    assert ppl["cpu"][1] == pytest.approx(ppl["cuda"][1], rel=2e-2)  # after training: bf16 autocast on CUDA
    student_w, kd = weights(student), weights(tmp_path / "kd-cuda")
    assert all(torch.equal(student_w[k] == 0, kd[k] == 0) for k in student_w if "experts" in k)  # mask kept


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "cutlass", "cusparselt"])
@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_sparse24_runs_its_kernels_and_agrees_with_the_dense_model(tmp_path, files, backend, stored):
    try:
        chosen = sparse24.gpu_backend(backend)
    except sparse24.SparsityError as e:
        pytest.skip(f"--backend {backend} does not run here: {e}")
    ckpt = write_checkpoint(tmp_path / "wide", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                            num_key_value_heads=2, dtype=stored)  # half precision, as the kernels take it
    text = files[1]
    pruned = str(tmp_path / "24")
    prune.main(prune_argv(ckpt, text, pruned, "--method", "moe-pruner", "--nm", "2:4", device="cuda"))
    report = sparse24.main(["--model", pruned, "--run", "--backend", backend, "--save", str(tmp_path / "packed")])
    assert report["model"]["converted_matrices"] > 0 and report["model"]["dtype"] == str(stored).replace("torch.", "")
    assert report["run"]["backend"] == chosen
    tol = 16 * torch.finfo(stored).eps  # the two kernels round their half-precision sums apart, layer after layer
    assert report["run"]["max_abs_diff"] <= tol * max(1.0, report["run"]["max_abs_logit"])
    dense = checkpoint.load_model(pruned, stored, "cuda")
    packed = sparse24.load_compressed(str(tmp_path / "packed"), "cuda", backend)
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref, out = dense(tokens).float(), packed(tokens).float()  # the stored values and metadata, on the kernels
    assert (out - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
