"""
When does 2:4 sparsity pay off? Dense vs semi-structured matmul at Mixtral-8x7B's expert shapes.

For each backend that runs on this GPU (sparse24.choose_backend: cuSPARSELt where torch has it,
CUTLASS on compute capability 8.x only), times F.linear with a
dense fp16 weight against the same weight as a semi-structured sparse tensor, at the two expert
shapes of Mixtral-8x7B (w1/w3: [14336, 4096]; w2: [4096, 14336]) for token counts 1..4096, then
one whole MoE block (8 experts, top-2) with dense vs semi-structured experts. Prints markdown
tables of times and speed-ups, measured side by side in one run (CUDA events, median of
--iters after warm-up).

CUDA only (compute capability 8.0+): on any other machine it says so in one line and exits 0.

    python -m bench.sparse24_kernels
    python -m bench.sparse24_kernels --dtype bfloat16 --tokens 1,64,512,4096
"""

import argparse
import statistics
import sys

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="weight and activation dtype")
    p.add_argument("--tokens", type=cli.comma_list(cli.positive_int), default="1,16,64,256,1024,4096", help="token counts (rows of the activation)")
    p.add_argument("--iters", type=cli.positive_int, default=20, help="timed repetitions (median reported)")
    p.add_argument("--moe-tokens", type=cli.comma_list(cli.positive_int), default="1,128,1024,4096", help="token counts for the whole MoE block")
    cli.add_json_args(p)
    return p


cli.parse_first(__name__, build_parser)

import torch
import torch.nn.functional as F

import mini_mixtral as mm
import prune
import sparse24
from checkpoint import DTYPES
from outputs import check_output_file
from progress import machine


def cuda_time(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))  # milliseconds
    return statistics.median(times)


def prune_nm(w):
    """2:4 by magnitude, with prune.py's N:M mask (the benchmark needs a valid pattern, not a good one)."""
    return w.masked_fill(prune.nm_mask(w.abs().float(), 2, 4), 0)


def markdown(results: dict) -> str:
    """The tables of a --json file: each matrix shape and the whole MoE block, dense against every backend."""
    backends = results["backends"]
    head = " | ".join(f"{b} ms | {b} speed-up" for b in backends)
    rule = "|---|---|---|" + "---|---|" * len(backends)
    cells = lambda r: " | ".join(f"{r[b]:.3f} | {r['dense'] / r[b]:.2f}x" for b in backends)
    lines = [f"{results['machine'].get('gpu')}, torch {results['machine']['torch']}, {results['dtype']}, median of "
             f"{results['iters']} (CUDA events)", "", f"| matrix | tokens | dense ms | {head} |", rule]
    lines += [f"| {r['matrix']} | {r['tokens']} | {r['dense']:.3f} | {cells(r)} |" for r in results["matrices"]]
    lines += ["", f"| MoE block (8 experts, top-2) | tokens | dense ms | {head} |", rule]
    lines += [f"| MoE block | {r['tokens']} | {r['dense']:.3f} | {cells(r)} |" for r in results["moe"]]
    return "\n".join(lines)


def usable_backends() -> list:
    """Every semi-structured backend sparse24's chooser accepts on this GPU."""
    usable = []
    for b in ("cutlass", "cusparselt"):
        try:
            usable.append(sparse24.gpu_backend(b))
        except sparse24.SparsityError:
            pass
    return usable


def bench(dtype_name: str, tokens: list, iters: int, moe_tokens: list) -> dict:
    """Every measurement, as markdown() prints it."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    backends = usable_backends()
    results = {"machine": machine(), "dtype": dtype_name, "iters": iters, "backends": backends, "matrices": [],
               "moe": []}
    shapes = {"w1/w3 [14336, 4096]": (14336, 4096), "w2 [4096, 14336]": (4096, 14336)}
    for label, (out_f, in_f) in shapes.items():
        w = prune_nm(torch.randn(out_f, in_f, device="cuda", dtype=dtype) * 0.02)
        sparse = {b: sparse24.to_semi_structured(w, b) for b in backends}
        for n in tokens:
            x = torch.randn(n, in_f, device="cuda", dtype=dtype)
            ref = F.linear(x, w)
            for b, ws in sparse.items():  # same numbers, or the timing means nothing
                torch.testing.assert_close(F.linear(x, ws), ref, rtol=2e-2, atol=2e-2)
            row = {"matrix": label, "tokens": n, "dense": cuda_time(lambda: F.linear(x, w), iters)}
            for b, ws in sparse.items():
                row[b] = cuda_time(lambda: F.linear(x, ws), iters)
            results["matrices"].append(row)

    cfg = mm.MixtralConfig(num_hidden_layers=1)  # one Mixtral-8x7B MoE block: 8 experts x 3 x 4096 x 14336
    with torch.device("cuda"):
        block = mm.SparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        for p_ in block.parameters():
            p_.normal_(0, 0.02)
        for e in block.experts:
            for lin in (e.w1, e.w2, e.w3):
                lin.weight.data = prune_nm(lin.weight.data)
    dense_w = {id(lin): lin.weight.data for e in block.experts for lin in (e.w1, e.w2, e.w3)}
    for n in moe_tokens:
        x = torch.randn(1, n, cfg.hidden_size, device="cuda", dtype=dtype)
        with torch.no_grad():
            for e in block.experts:
                for lin in (e.w1, e.w2, e.w3):
                    lin.weight = torch.nn.Parameter(dense_w[id(lin)], requires_grad=False)
            ref = block(x)[0]
            row = {"tokens": n, "dense": cuda_time(lambda: block(x), iters)}
            for b in backends:
                for e in block.experts:
                    for lin in (e.w1, e.w2, e.w3):
                        lin.weight = torch.nn.Parameter(sparse24.to_semi_structured(dense_w[id(lin)], b),
                                                        requires_grad=False)
                torch.testing.assert_close(block(x)[0], ref, rtol=5e-2, atol=5e-2)
                row[b] = cuda_time(lambda: block(x), iters)
        results["moe"].append(row)
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    with cli.errors():
        if args.json:
            check_output_file(args.json, args.overwrite)  # refused even where no GPU would measure anything
        try:
            sparse24.gpu_backend("auto")  # some backend runs here, or the reason none does
        except sparse24.SparsityError as e:
            print(f"bench.sparse24_kernels: {e}; nothing measured")
            return 0
        cli.measure_and_save(lambda: bench(args.dtype, args.tokens, args.iters, args.moe_tokens), markdown, args.json,
                             args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
