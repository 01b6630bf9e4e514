"""
2:4 semi-structured sparsity through torch.sparse: validity, compressed storage, sparse kernels.

MoE-Pruner Section 3.2 ("Structured N:M Sparsity"): a 2:4 mask (2 of every 4 consecutive inputs
of a row kept) can run on the sparse tensor cores of NVIDIA GPUs from Ampere (sm80) on. This
script makes that concrete for a checkpoint pruned with `prune.py --nm 2:4`:

  1. check that every pruned matrix is a valid 2:4 pattern along its input dimension (a clear
     error names the first offending matrix, row and group);
  2. compress the expert weights to torch's semi-structured layout (kept values + 2-bit index
     metadata, CUTLASS order) with torch.sparse's own conversion functions, which run on any
     machine, and check that dense -> compressed -> dense is bitwise exact;
  3. report storage: compressed against dense bytes per matrix and for the model. In fp16/bf16
     a matrix keeps half its values plus 4 bits of metadata per group of 4, i.e. 16-bit values
     x 1/2 + 4 bits / 4 = 9 bits per weight: 9/16 = 56.25% of dense;
  4. on CUDA, run the model with semi-structured expert weights through one of torch.sparse's two
     backends and compare its logits with the masked dense model. The backend follows the GPU
     (`choose_backend`): torch builds its CUTLASS semi-structured kernels for compute capability
     8.x only, cuSPARSELt runs on 8.x, 9.0 (H100/H200) and newer; --backend auto takes
     cuSPARSELt where torch has it, CUTLASS on 8.x without it.

Which matrices: the expert matrices (and attention with --include-attention, for checkpoints
pruned with --prune-attention). A matrix is converted only if it is fp16/bf16 (fp32 does not
round-trip through the compressed layout) and its rows are a multiple of 32 and its columns a
multiple of 64 (the larger of the CUTLASS and cuSPARSELt minimum tiles; the converter's own
checks let some other shapes through, which then fail with an opaque index error). Anything
else, e.g. the [8, 4096] router, stays dense.

torch.sparse alone is used (torchao's sparsity module has been removed upstream).

    python prune.py --method moe-pruner --nm 2:4 --out out/moe-pruner-24
    python sparse24.py --model out/moe-pruner-24                # check + storage, any machine
    python sparse24.py --model out/moe-pruner-24 --run          # + sparse-kernel logits, CUDA only
    python sparse24.py --prune-from DIR --method wanda --out out/wanda-24   # prune to 2:4 first
"""

import argparse

import cli

BACKENDS = ("auto", "cutlass", "cusparselt")


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--model", help="a checkpoint pruned with prune.py --nm 2:4")
    p.add_argument("--prune-from", help="prune this checkpoint to 2:4 first (prune.py's functions) into --out")
    p.add_argument("--method", default="moe-pruner", choices=cli.METHODS, help="with --prune-from: the pruning method")
    p.add_argument("--out", help="with --prune-from: where the 2:4 checkpoint goes")
    p.add_argument("--dtype", choices=["float16", "bfloat16"],
                   help="half precision for the compressed layout (default: the stored dtype if half, else float16)")
    p.add_argument("--include-attention", action="store_true",
                   help="also check and convert q/k/v/o (for checkpoints pruned with --prune-attention)")
    p.add_argument("--run", action="store_true", help="run the model with semi-structured weights on CUDA and "
                                                      "compare its logits with the dense masked model")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="torch's semi-structured kernels for --run: auto (default) takes cuSPARSELt where this "
                        "torch has it, else CUTLASS, which torch builds for compute capability 8.x only")
    p.add_argument("--save", help="also write the checkpoint with its 2:4 matrices stored compressed (kept values + "
                                  "metadata, ~56%% of their dense bytes) to this folder; load it with "
                                  "sparse24.load_compressed")
    p.add_argument("--json", help="write the storage report (and the --run comparison) to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --out and --json if they exist")
    return p


cli.parse_first(__name__, build_parser)

import torch
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
from torch.sparse._semi_structured_conversions import (sparse_semi_structured_from_dense_cutlass,
                                                       sparse_semi_structured_to_dense_cutlass)

import data
import mini_mixtral as mm
import prune
from checkpoint import (DTYPES, STORED_DTYPES, CheckpointReader, CheckpointWriter, expected_shapes, load_model,
                        read_config)
from outputs import check_output, check_output_file, json_text, write_output_file
from mini_mixtral import MixtralConfig

HALF = (torch.float16, torch.bfloat16)
MIN_ROWS, MIN_COLS = 32, 64  # CUTLASS fp16/bf16 tile (cuSPARSELt's 16 x 16 divides it)


class SparsityError(Exception):
    """A matrix is not a valid 2:4 pattern, or cannot use the semi-structured layout."""


def check_24(name: str, w: torch.Tensor):
    """Raise naming the first group of 4 consecutive inputs that keeps more than 2 weights."""
    rows, cols = w.shape
    if cols % 4:
        raise SparsityError(f"{name}: {cols} inputs is not a multiple of 4")
    nonzero = (w != 0).reshape(rows, cols // 4, 4).sum(dim=2)  # [rows, groups]
    bad = (nonzero > 2).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise SparsityError(f"{name}: row {r}, inputs {4 * g}..{4 * g + 3} keep {nonzero[r, g].item()} of 4 "
                            f"(not 2:4)")


def convertible(w: torch.Tensor):
    """None if w can use the semi-structured layout, else the reason it stays dense."""
    if w.dim() != 2:
        return f"{w.dim()}-D"
    if w.dtype not in HALF:
        return f"{w.dtype} (fp16/bf16 only: fp32 does not round-trip the compressed layout)"
    r, c = w.shape
    if r % MIN_ROWS or c % MIN_COLS:
        return f"shape {list(w.shape)} (needs rows % {MIN_ROWS} == 0 and cols % {MIN_COLS} == 0)"
    return None


def compress(w: torch.Tensor):
    """Dense 2:4 matrix [rows, cols] -> (values [rows, cols/2], metadata [rows, cols/16] int16)
    in CUTLASS's layout, on whatever device w is (CPU included)."""
    reason = convertible(w)
    if reason:
        raise SparsityError(f"cannot compress a matrix of {reason}")
    return sparse_semi_structured_from_dense_cutlass(w)


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return sparse_semi_structured_to_dense_cutlass(values, meta)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def storage_report(model_dir: str, dtype=None, include_attention=False, writer: CheckpointWriter = None):
    """Check, compress and round-trip every pruned matrix, one at a time from the checkpoint.
    With a writer, also write the compressed checkpoint: each converted matrix NAME as NAME.packed
    and NAME.meta, every other tensor as stored. Returns {"matrices": {name: {...}}, "model": {...}}."""
    reader = CheckpointReader(model_dir)
    dtype = dtype or (reader.stored_dtype() if reader.stored_dtype() in HALF else torch.float16)
    matrices, total_dense, total_sparse = {}, 0, 0
    for name in sorted(reader.weight_map, key=lambda k: (len(k), k)):
        w = reader.get(name, dtype)
        if not torch.isfinite(w).all():  # stored finite (the reader checks), so the cast overflowed
            raise SparsityError(f"{name}: its {reader.dtype_of(name)} values overflow {dtype} (largest "
                                f"{reader.get(name).abs().max().item():.4g}); choose --dtype bfloat16")
        dense = nbytes(w)
        pruned_kind = ".experts." in name or (include_attention and ".self_attn." in name)
        reason = convertible(w) if pruned_kind else "not a pruned matrix"
        if pruned_kind:
            check_24(name, w)
        if reason is None:
            values, meta = compress(w)
            if not torch.equal(decompress(values, meta), w):
                raise SparsityError(f"{name}: compressed round trip is not exact")
            sparse = nbytes(values) + nbytes(meta)
            matrices[name] = {"dense_bytes": dense, "values_bytes": nbytes(values), "meta_bytes": nbytes(meta),
                              "ratio": sparse / dense}
            if writer is not None:
                writer.add(name + PACKED, values)
                writer.add(name + META, meta)
        else:
            sparse = dense
            if pruned_kind:
                matrices[name] = {"dense_bytes": dense, "kept_dense": reason, "ratio": 1.0}
            if writer is not None:
                writer.add(name, reader.get(name))  # bitwise as stored
        total_dense += dense
        total_sparse += sparse
    model = {"dtype": str(dtype).replace("torch.", ""), "stored_dtype": str(reader.stored_dtype()).replace("torch.", ""),
             "dense_bytes": total_dense, "semi_structured_bytes": total_sparse,
             "ratio": total_sparse / total_dense,
             "converted_matrices": sum("kept_dense" not in m for m in matrices.values()),
             "kept_dense": {k: m["kept_dense"] for k, m in matrices.items() if "kept_dense" in m}}
    return {"matrices": matrices, "model": model}


# -----------------------------------------------------------------------------
# The compressed checkpoint: 2:4 matrices stored as kept values + metadata


PACKED, META = ".packed", ".meta"  # NAME.packed [rows, cols/2] kept values; NAME.meta [rows, cols/16] int16
FORMAT = "2:4-cutlass"  # torch's CUTLASS semi-structured layout, as SparseSemiStructuredTensorCUTLASS holds it


def save_compressed(model_dir: str, out: str, dtype=None, include_attention=False, overwrite=False) -> dict:
    """Write model_dir with every convertible 2:4 matrix stored compressed (~56% of its dense
    bytes), the other tensors unchanged; config.json's sparse_format names the layout and the
    compressed matrices. Returns the storage report."""
    reader = CheckpointReader(model_dir)
    check_output(out, overwrite, [model_dir])
    with CheckpointWriter(out, reader.config, overwrite=overwrite, src_dir=model_dir) as writer:
        report = storage_report(model_dir, dtype, include_attention, writer)
        compressed = sorted(k for k, m in report["matrices"].items() if "kept_dense" not in m)
        writer.config = MixtralConfig.from_dict({**reader.config.to_dict(), "sparse_format": {
            "format": FORMAT, "dtype": report["model"]["dtype"], "compressed": compressed}})
        writer.extra_files["sparse24_report.json"] = report
    return report


def compressed_layout(config: MixtralConfig) -> dict:
    """{key: (shape, safetensors dtypes)} of a compressed checkpoint, for CheckpointReader."""
    fmt = config.extra["sparse_format"]
    if fmt.get("format") != FORMAT:
        raise SparsityError(f"sparse_format {fmt.get('format')!r} is not {FORMAT!r}")
    layout = {k: (s, STORED_DTYPES) for k, s in expected_shapes(config).items()}
    for name in fmt["compressed"]:
        rows, cols = layout.pop(name)[0]
        layout[name + PACKED] = ((rows, cols // 2), ("F16", "BF16"))
        layout[name + META] = ((rows, cols // 16), ("I16",))
    return layout


def load_compressed(path: str, device="cpu", backend: str = "auto") -> mm.Mixtral:
    """A compressed checkpoint as a model, every weight in the compressed matrices' dtype (one
    compute dtype, whatever the other tensors are stored in). On CPU every compressed matrix is
    decompressed, bitwise the dense 2:4 matrix it was made from. On CUDA it becomes a semi-
    structured tensor of the backend gpu_backend chooses: CUTLASS's straight from the stored values
    and metadata (its own layout, no dense copy), cuSPARSELt's from the matrix decompressed on the
    GPU (cuSPARSELt keeps another layout)."""
    backend = gpu_backend(backend, device) if torch.device(device).type == "cuda" else None
    config = read_config(path)
    if not config.extra.get("sparse_format"):
        raise SparsityError(f"{path} has no sparse_format in config.json: not a compressed checkpoint")
    reader = CheckpointReader(path, layout=compressed_layout(config))
    compressed = set(config.extra["sparse_format"]["compressed"])
    dtype = DTYPES[config.extra["sparse_format"]["dtype"]]
    with torch.device("meta"):
        model = mm.Mixtral(config)
    model = model.to_empty(device=device)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if name not in compressed:
                p.data = reader.get(name, dtype, device)
                continue
            packed, meta = reader.get(name + PACKED, device=device), reader.get(name + META, device=device)
            if backend == "cutlass":
                w = SparseSemiStructuredTensorCUTLASS(p.shape, packed=packed, meta=meta, packed_t=None, meta_t=None,
                                                      compressed_swizzled_bitmask=None)
            elif backend == "cusparselt":
                w = SparseSemiStructuredTensorCUSPARSELT.from_dense(decompress(packed, meta))
            else:
                p.data = decompress(packed, meta)
                continue
            modules[name.rsplit(".", 1)[0]].weight = torch.nn.Parameter(w, requires_grad=False)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


# -----------------------------------------------------------------------------
# CUDA: semi-structured weights inside the model


def require_cuda():
    if not torch.cuda.is_available():
        raise SparsityError("semi-structured sparse kernels need a CUDA GPU (compute capability 8.0 or newer); "
                            "none is available")


def choose_backend(requested: str, capability: tuple, has_cusparselt: bool) -> str:
    """The semi-structured backend for a GPU of compute capability (major, minor): 'cutlass' or
    'cusparselt'. torch builds its CUTLASS 2:4 kernels for 8.x only (A100, A10, L4, ...);
    cuSPARSELt, where this torch build has it, runs on 8.x, 9.0 (H100/H200) and newer. 'auto'
    takes cuSPARSELt when it is there, else CUTLASS on 8.x; anything that cannot run is refused."""
    major, minor = capability
    if major < 8:
        raise SparsityError(f"semi-structured sparse kernels need compute capability 8.0 or newer; this GPU is "
                            f"{major}.{minor}")
    if requested == "cusparselt" or (requested == "auto" and has_cusparselt):
        if not has_cusparselt:
            raise SparsityError("cuSPARSELt is not available in this torch build; use --backend auto or cutlass")
        return "cusparselt"
    if requested not in ("auto", "cutlass"):
        raise SparsityError(f"unknown backend {requested!r}; choose {', '.join(BACKENDS)}")
    if major != 8:
        raise SparsityError(f"{'--backend cutlass' if requested == 'cutlass' else 'no 2:4 backend'}: torch's CUTLASS "
                            f"semi-structured kernels run on compute capability 8.x only and this GPU is "
                            f"{major}.{minor}" + ("" if has_cusparselt else "; this torch build has no cuSPARSELt"))
    return "cutlass"


def gpu_backend(requested: str, device="cuda") -> str:
    """choose_backend for the GPU `device` names and this torch build."""
    require_cuda()
    return choose_backend(requested, torch.cuda.get_device_capability(device),
                          torch.backends.cusparselt.is_available())


BACKEND_CLASSES = {"cutlass": SparseSemiStructuredTensorCUTLASS, "cusparselt": SparseSemiStructuredTensorCUSPARSELT}


def to_semi_structured(w: torch.Tensor, backend: str):
    """w (2:4, on a GPU) as a semi-structured tensor of the backend gpu_backend chose."""
    reason = convertible(w)
    if reason:
        raise SparsityError(f"cannot convert a matrix of {reason}")
    return BACKEND_CLASSES[backend].from_dense(w)


def sparsify_experts(model: mm.Mixtral, backend: str, include_attention=False):
    """Swap every convertible pruned matrix's weight for a semi-structured tensor of `backend`
    ('cutlass' or 'cusparselt', as gpu_backend chose) in place; F.linear then dispatches to the
    sparse kernel. Returns the names left dense and why."""
    kept = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".experts." in name or (include_attention and "self_attn." in name)):
            w = module.weight.data
            check_24(name, w)
            reason = convertible(w)
            if reason:
                kept[name] = reason
                continue
            module.weight = torch.nn.Parameter(to_semi_structured(w, backend), requires_grad=False)
    return kept


@torch.no_grad()
def compare_logits(model_dir, backend, dtype, windows, include_attention=False):
    """Max |logits difference| between the masked dense model and the semi-structured one."""
    dense = load_model(model_dir, dtype, "cuda")
    ref = dense(windows.cuda()).float()
    kept = sparsify_experts(dense, backend, include_attention)
    out = dense(windows.cuda()).float()
    return {"max_abs_diff": (out - ref).abs().max().item(), "max_abs_logit": ref.abs().max().item(),
            "kept_dense": kept}


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with cli.errors(SparsityError):
        backend = gpu_backend(args.backend) if args.run else None  # before any work
        inputs = [args.model or data.default_model_dir(), args.prune_from]
        if args.json:
            check_output_file(args.json, args.overwrite, inputs)
        if args.save:  # before the pruning of --prune-from: the output rule, and not --out itself
            check_output(args.save, args.overwrite, [*inputs, args.out])
        if args.prune_from:
            if not args.out:
                raise data.DataError("--prune-from needs --out")
            prune.prune_checkpoint(args.prune_from, args.out, prune.PruneArgs(
                method=args.method, nm="2:4", prune_attention=args.include_attention,
                device="cuda" if torch.cuda.is_available() else "cpu"), args.overwrite)
            model_dir = args.out
        else:
            model_dir = args.model or data.default_model_dir()
        dtype = DTYPES[args.dtype] if args.dtype else None
        if args.save:
            report = save_compressed(model_dir, args.save, dtype, args.include_attention, args.overwrite)
            print(f"wrote {args.save}: {report['model']['converted_matrices']} matrices stored compressed")
        else:
            report = storage_report(model_dir, dtype, args.include_attention)
        m = report["model"]
        print(f"{model_dir}: every pruned matrix is 2:4; {m['converted_matrices']} matrices compressed and "
              f"round-tripped bitwise in {m['dtype']}" + (f" (rounded from the stored {m['stored_dtype']})"
                                                          if m["stored_dtype"] != m["dtype"] else ""))
        print(f"storage: {m['semi_structured_bytes'] / 2**20:.2f} MiB semi-structured vs {m['dense_bytes'] / 2**20:.2f} "
              f"MiB dense ({m['ratio']:.2%} of dense)")
        ex = next((v for v in report["matrices"].values() if "values_bytes" in v), None)
        if ex:
            print(f"per converted matrix: values {ex['values_bytes']} B + metadata {ex['meta_bytes']} B = "
                  f"{ex['ratio']:.2%} of {ex['dense_bytes']} B dense")
        for k, why in m["kept_dense"].items():
            print(f"kept dense: {k}: {why}")
        if args.run:
            cfg = read_config(model_dir)
            ids = data.encode(data.load_tokenizer(model_dir), data.stdlib_text("eval"))
            windows = data.sample_windows(data.eval_windows(ids, min(512, cfg.max_position_embeddings)), 4)[0]
            run = compare_logits(model_dir, backend, DTYPES[m["dtype"]], windows, args.include_attention)
            report["run"] = {"backend": backend, "gpu": torch.cuda.get_device_name(), **run}
            print(f"{backend} on {report['run']['gpu']}: max |logit difference| {run['max_abs_diff']:.4g} "
                  f"(max |logit| {run['max_abs_logit']:.3g})")
        if args.json:
            write_output_file(args.json, json_text(report), args.overwrite)
    return report


if __name__ == "__main__":
    main()
