"""
Forward throughput of mini_mixtral against transformers' MixtralForCausalLM, side by side.

Both models get the same random official-layout checkpoint and the same token batches; runs
alternate (ours, theirs, ours, ...) so that machine noise hits both alike, and the median of
--repeats runs is reported. transformers is a test-only dependency: this script needs it.

    python -m bench.forward --threads 2,1 --json results/bench/forward.json   # the embedded model's shape
    python -m bench.forward --hidden-size 1024 --intermediate-size 3584 --num-hidden-layers 2 --batch-size 1 --seqlen 2048
"""

import argparse
import importlib.util
import statistics
import tempfile
import time

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    for flag, former, default, what in (("--hidden-size", "--hidden", 256, "config.json's hidden_size (the embedded model's)"),
                                         ("--intermediate-size", "--intermediate", 512, "intermediate_size per expert"),
                                         ("--num-hidden-layers", "--layers", 4, "decoder layers"),
                                         ("--num-local-experts", "--experts", 8, "experts per layer (top-2 routing)"),
                                         ("--vocab-size", "--vocab", 4096, "vocabulary"),
                                         ("--batch-size", "--batch", 8, "windows per forward")):
        p.add_argument(flag, former, type=cli.positive_int, default=default, help=what + cli.spelled((former,)))
    p.add_argument("--seqlen", type=cli.seqlen, default=512, help="tokens per window")
    p.add_argument("--repeats", type=cli.positive_int, default=7, help="timed runs per model (median reported)")
    p.add_argument("--threads", type=cli.comma_list(cli.nonnegative_int), default="0",
                   help="comma list of torch thread counts to measure at, 0 for torch's choice (e.g. 2,1)")
    cli.add_json_args(p)
    return p


cli.parse_first(__name__, build_parser)

import torch

import data
import mini_mixtral as mm
from checkpoint import load_model, save_model
from progress import machine


def timed(fn, x):
    t = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - t


def measure(cfg: mm.MixtralConfig, batch_size: int, seqlen: int, repeats: int, threads: list) -> dict:
    """Tokens per second of each model at each thread count, runs alternating, median of repeats."""
    import transformers  # the test-only reference, imported where it is used (the docs import this module)
    ours = mm.init_weights(mm.Mixtral(cfg), std=0.02, seed=0).eval()
    res = {"machine": machine(), "transformers": transformers.__version__, "batch_size": batch_size, "seqlen": seqlen,
           "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_local_experts",
                                                   "num_hidden_layers", "vocab_size")}, "runs": []}
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d + "/ck")
        models = {"mini_mixtral": load_model(d + "/ck")}
        for impl in ("grouped_mm", "eager"):  # transformers' default experts path, and its plain loop
            try:
                models[f"transformers ({impl} experts)"] = transformers.MixtralForCausalLM.from_pretrained(
                    d + "/ck", dtype=torch.float32, experts_implementation=impl).eval()
            except (ValueError, ImportError) as e:
                print(f"transformers {impl}: unavailable ({e})")
    x = torch.randint(0, cfg.vocab_size, (batch_size, seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = models["mini_mixtral"](x)
        for name, m in models.items():
            out = m(x) if name == "mini_mixtral" else m(x).logits
            assert (out - ref).abs().max() < 1e-3, f"{name} disagrees with mini_mixtral"
    for n in threads:
        if n:
            torch.set_num_threads(n)
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():
                times[name].append(timed(m, x))
        res["runs"].append({"threads": torch.get_num_threads(),
                            "tokens_per_s": {name: x.numel() / statistics.median(ts) for name, ts in times.items()}})
    return res


def markdown(res: dict) -> str:
    """One table per thread count: tokens/s and mini_mixtral's speed-up over each model."""
    c, out = res["config"], []
    for run in res["runs"]:
        rate = run["tokens_per_s"]
        out += [f"forward of {res['batch_size']} x {res['seqlen']} tokens, hidden {c['hidden_size']}, "
                f"{c['num_local_experts']} experts x {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
                f"{run['threads']} threads of a {res['machine']['cores']}-core {res['machine']['cpu']}, torch "
                f"{res['machine']['torch']}, transformers {res['transformers']}", "",
                "| model | tokens/s | mini_mixtral speed-up |", "|---|---|---|"]
        out += [f"| {name} | {r:,.0f} | {rate['mini_mixtral'] / r:.2f}x |" for name, r in rate.items()] + [""]
    return "\n".join(out).strip()


def facts(res: dict) -> dict:
    """The speed-ups documents quote: "speed-up:THREADS:grouped_mm" (or eager, mini_mixtral)."""
    short = lambda name: name.split("(")[1].split()[0] if "(" in name else name  # "transformers (eager experts)"
    return {f"speed-up:{run['threads']}:{short(name)}": f"{run['tokens_per_s']['mini_mixtral'] / r:.2f}"
            for run in res["runs"] for name, r in run["tokens_per_s"].items()}


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with cli.errors():
        if importlib.util.find_spec("transformers") is None:
            raise data.DataError("bench.forward compares against transformers: pip install -r requirements-test.txt")
        cfg = mm.MixtralConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                               intermediate_size=args.intermediate_size, num_hidden_layers=args.num_hidden_layers,
                               num_attention_heads=8, num_key_value_heads=2, num_local_experts=args.num_local_experts,
                               num_experts_per_tok=2, rope_theta=10000.0, max_position_embeddings=args.seqlen,
                               torch_dtype="float32")
        return cli.measure_and_save(lambda: measure(cfg, args.batch_size, args.seqlen, args.repeats, args.threads), markdown,
                                    args.json, args.overwrite)


if __name__ == "__main__":
    main()
