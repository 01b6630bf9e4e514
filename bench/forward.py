"""
Forward throughput of mini_mixtral against transformers' MixtralForCausalLM, side by side.

Both models get the same random official-layout checkpoint and the same token batches; runs
alternate (ours, theirs, ours, ...) so that machine noise hits both alike, and the median of
--repeats runs is reported. transformers is a test-only dependency: this script needs it.

    python -m bench.forward                       # the embedded model's shape
    python -m bench.forward --hidden-size 1024 --intermediate-size 3584 --num-hidden-layers 2 --batch-size 1 --seqlen 2048
"""

import statistics
import tempfile
import time

import torch

import cli
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
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if transformers is None:
        raise SystemExit("error: bench.forward compares against transformers: pip install -r requirements-test.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = mm.MixtralConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                           num_hidden_layers=args.num_hidden_layers, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=args.num_local_experts, num_experts_per_tok=2, rope_theta=10000.0,
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
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seqlen), generator=torch.Generator().manual_seed(0))
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
    print(f"forward of {args.batch_size} x {args.seqlen} tokens, hidden {args.hidden_size}, {args.num_local_experts} experts x "
          f"{args.intermediate_size}, {args.num_hidden_layers} layers, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("| model | tokens/s | mini_mixtral speed-up |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {tokens / med:,.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
