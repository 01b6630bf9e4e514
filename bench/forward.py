"""
Forward throughput of mini_mixtral against transformers' MixtralForCausalLM, side by side.

Both models get the same random official-layout checkpoint and the same token batches; runs
alternate (ours, theirs, ours, ...) so that machine noise hits both alike, and the median of
--repeats runs is reported. transformers is a test-only dependency: this script needs it.

    python -m bench.forward                       # the embedded model's shape
    python -m bench.forward --hidden 1024 --intermediate 3584 --layers 2 --batch 1 --seqlen 2048
"""

import argparse
import statistics
import tempfile
import time

import torch

import mini_mixtral as mm
from checkpoint import load_model, save_model

try:  # test-only dependency: the reference this benchmark compares against
    import transformers
except ImportError:
    transformers = None


def timed(fn, x):
    t = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="hidden_size (default: the embedded model's)")
    p.add_argument("--intermediate", type=int, default=512, help="intermediate_size per expert")
    p.add_argument("--layers", type=int, default=4, help="num_hidden_layers")
    p.add_argument("--experts", type=int, default=8, help="num_local_experts (top-2 routing)")
    p.add_argument("--vocab", type=int, default=4096, help="vocab_size")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per model (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if transformers is None:
        raise SystemExit("error: bench.forward compares against transformers: pip install -r requirements-test.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = mm.MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=args.experts, num_experts_per_tok=2, rope_theta=10000.0,
                           max_position_embeddings=args.seqlen, torch_dtype="float32")
    ours = mm.init_weights(mm.Mixtral(cfg), std=0.02, seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d + "/ck")
        models = {"mini_mixtral": load_model(d + "/ck")}
        for impl in ("grouped_mm", "eager"):  # transformers' default experts path, and its plain loop
            try:
                models[f"transformers ({impl} experts)"] = transformers.MixtralForCausalLM.from_pretrained(
                    d + "/ck", dtype=torch.float32, experts_implementation=impl).eval()
            except (ValueError, ImportError) as e:
                print(f"transformers {impl}: unavailable ({e})")
    x = torch.randint(0, args.vocab, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = models["mini_mixtral"](x)
        for name, m in models.items():
            out = m(x) if name == "mini_mixtral" else m(x).logits
            assert (out - ref).abs().max() < 1e-3, f"{name} disagrees with mini_mixtral"
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            times[name].append(timed(m, x))
    tokens = x.numel()
    base = statistics.median(times["mini_mixtral"])
    print(f"forward of {args.batch} x {args.seqlen} tokens, hidden {args.hidden}, {args.experts} experts x "
          f"{args.intermediate}, {args.layers} layers, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("| model | tokens/s | mini_mixtral speed-up |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {tokens / med:,.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
