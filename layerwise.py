"""
One decoder layer at a time: the loop that prune.py, distill.py (per-expert mode) and
expert_prune.py share, so that a model far larger than memory can be processed.

The calibration windows are embedded once; then each decoder layer is read from the checkpoint
alone, the caller does its work on it (collect statistics, prune, distil, slice experts) and
runs the activations through it to make the next layer's inputs, and the layer is written to
the output checkpoint and freed. Only one decoder layer's weights and the calibration
activations [n, T, hidden] are ever in memory. This is the layer-wise protocol of SparseGPT's
and Wanda's reference code, and the shape of MoE-Pruner's Algorithm 1.

    with CheckpointWriter(out, reader.config, src_dir=reader.path) as writer:
        x, pos = embed_windows(reader, tokens, device)
        for l, layer in layers(reader, writer, device):
            ...                                   # change layer's weights in place
            x = run_layer(layer, x, pos, batch_size)
"""

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch

import mini_mixtral as mm
from checkpoint import CheckpointReader, CheckpointWriter, load_embedding, load_layer


class Positions(NamedTuple):
    """What every layer needs besides its input: the rotary tables and the attention mask."""

    cos: torch.Tensor  # [T, head_dim]
    sin: torch.Tensor  # [T, head_dim]
    mask: Optional[torch.Tensor]  # [T, T] bool with a sliding window shorter than T, else None (causal)


@torch.no_grad()
def embed_windows(reader: CheckpointReader, tokens: torch.Tensor, device, act_dtype=torch.float32):
    """Calibration windows [n, T] -> (activations [n, T, hidden] in act_dtype, Positions)."""
    emb = load_embedding(reader, torch.float32, device)
    x = emb(tokens.to(device)).to(act_dtype)
    cos, sin = mm.rope_cos_sin(reader.config, tokens.shape[1], device)
    return x, Positions(cos, sin, mm.attention_mask(tokens.shape[1], reader.config.sliding_window, device))


def compute_dtype(device_type: str, dtype, cache_casts: bool = False) -> contextlib.AbstractContextManager:
    """The context a forward runs in: for bfloat16 (torch.bfloat16 or "bfloat16") the matrix
    products under autocast, the weights staying float32 so that pruning and writing them back
    are exact (on a CPU with AMX or AVX-512 BF16, or a GPU, several times faster; `python -m
    bench.scale --rates-only` measures a machine's rates); for float32 nothing changes, and an
    enclosing compute_dtype still applies. cache_casts keeps each weight's bfloat16 copy for the
    whole context instead of casting it again in every batch: only where the weights cannot change
    inside it (a no_grad pass; a training loop must not)."""
    if dtype in (torch.bfloat16, "bfloat16"):
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=cache_casts)
    return contextlib.nullcontext()


@torch.no_grad()
def run_layer(layer: mm.DecoderLayer, x: torch.Tensor, pos: Positions, batch_size: int, observer=None,
              dtype=torch.float32, halves: Optional[list] = None):
    """The layer's outputs for all windows, x [n, T, hidden] -> [n, T, hidden] in x's dtype,
    batch_size windows at a time, computed in dtype (see compute_dtype). With halves a list, each
    batch's attention-half output ([batch, T, hidden] float32) and router logits are appended to
    it, for rerun_moe_half."""
    out = torch.empty_like(x)
    with compute_dtype(x.device.type, dtype, cache_casts=True):  # no_grad: the weights stay as they are
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].float()  # [batch, T, hidden]
            if halves is None:
                y = layer(xb, pos.cos, pos.sin, pos.mask, observer)[0]
            else:  # the same two halves layer() runs, keeping what lies between them
                a = layer.attend(xb, pos.cos, pos.sin, pos.mask)
                y, logits = layer.moe_half(a, observer)
                halves.append((a, logits))
            out[i:i + batch_size] = y.to(x.dtype)
    return out


@torch.no_grad()
def rerun_moe_half(layer: mm.DecoderLayer, halves: list, out_dtype, observer=None, dtype=torch.float32):
    """The layer's outputs after only its experts changed: the MoE half alone, from the attention-half
    outputs and router logits that run_layer kept (attention and router are unchanged, so their
    outputs are too). Bitwise what run_layer would return, without running attention and router."""
    with compute_dtype(halves[0][0].device.type, dtype, cache_casts=True):
        return torch.cat([layer.moe_half(a, observer, logits)[0].to(out_dtype) for a, logits in halves])


def copy_outside_layers(reader: CheckpointReader, writer: CheckpointWriter):
    """Embedding, final norm and lm_head, written bitwise as stored."""
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if name in reader.weight_map and not (name == "lm_head.weight" and reader.config.tie_word_embeddings):
            writer.add(name, reader.get(name))


def weight_dtype(reader: CheckpointReader, l: int, compute=torch.float32) -> torch.dtype:
    """The dtype layer l is held in: bfloat16 where it computes in bfloat16 (compute_dtype) and the
    checkpoint stores every weight of the layer in bfloat16, so that holding it so is exact and no
    pass casts it again; else float32, in which pruning's arithmetic and the written weights are exact."""
    names = [n for n in reader.weight_map if n.startswith(f"model.layers.{l}.")]
    if compute in (torch.bfloat16, "bfloat16") and all(reader.dtype_of(n) == torch.bfloat16 for n in names):
        return torch.bfloat16
    return torch.float32


def write_layer(writer: CheckpointWriter, reader: CheckpointReader, l: int, layer: mm.DecoderLayer):
    """Layer l's weights, each in the dtype the checkpoint stores it in (a float16/bfloat16 value
    survives the float32 round trip exactly, so an unchanged weight is written bitwise as stored),
    flushed as one shard: nothing of layer l stays in the writer. Parameter names come from the layer
    as it is, so a caller may replace its MoE block (expert_prune.py writes fewer experts)."""
    for name, p in layer.named_parameters():
        full = f"model.layers.{l}.{name}"
        writer.add(full, p.data.to(reader.dtype_of(full)))
    writer.flush()


def layers(reader: CheckpointReader, writer: Optional[CheckpointWriter], device, compute=torch.float32) -> Iterator[tuple]:
    """Yield (l, decoder layer l) for every layer in turn, each read alone on device, in float32 (in
    bfloat16 where weight_dtype says it computes in bfloat16 and is stored so).

    With a writer, the embedding, final norm and lm_head are copied to it first, and when the caller
    moves on from layer l, write_layer writes it. Either way the layer's weights are then freed,
    even if the caller still holds the module. With writer None the caller writes what it wants
    (prune.py, where a reader sees it), or the layers are only read (a pass that measures the
    dense model).
    """
    if writer is not None:
        copy_outside_layers(reader, writer)
    for l in range(reader.config.num_hidden_layers):
        layer = load_layer(reader, l, weight_dtype(reader, l, compute), device)
        yield l, layer
        if writer is not None:
            write_layer(writer, reader, l, layer)
        layer.to("meta")
