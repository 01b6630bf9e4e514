"""
Checkpoints in the official Hugging Face layout: config.json, model.safetensors or sharded
model-0000i-of-0000n.safetensors + model.safetensors.index.json, tokenizer files beside them.

Three families share mini_mixtral.py's model: Mixtral, OLMoE and Qwen3-MoE. FAMILIES is the one
name map between their config.json keys and tensor names and Mixtral's, which the model's modules
and every script use; a checkpoint is read and written in its own family's names.

  - read_config / CheckpointReader: lazy, memory-mapped reading. Opening a checkpoint reads only
    the shards' headers and checks, from them alone, that the key set and every shape match the
    config one for one (as nanoGPT's from_pretrained does); load_layer then materialises one
    decoder layer of Mixtral-8x7B (~93 GB in all) without touching the rest.
  - CheckpointWriter / save_model: streaming writing, one shard at a time, into a temporary
    sibling folder that becomes the output only when the whole checkpoint is written.
  - load_model: the whole model, for evaluation and distillation.

Every problem with a checkpoint raises CheckpointError with a one-line message naming it.
"""

import json
import math
import os
import shutil
import stat
import tempfile
from typing import Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import cli
from cli import UserError
from mini_mixtral import DecoderLayer, Mixtral, MixtralConfig
from outputs import check_output, publish, remove, remove_stale_temps, umask


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message is one line naming the problem."""


# -----------------------------------------------------------------------------
# The families: each one's names where they differ from Mixtral's, and the switches its decoder implies

OLMOE_TENSORS = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                 (".w2.", ".down_proj."))  # (Mixtral's, theirs): the router is mlp.gate, the experts mlp.experts.E
FAMILIES = {
    "mixtral": dict(architecture="MixtralForCausalLM", keys={}, tensors=(),
                    switches=dict(qk_norm=None, norm_topk_prob=True), defaults={}),
    "olmoe": dict(architecture="OlmoeForCausalLM", keys={"num_local_experts": "num_experts"}, tensors=OLMOE_TENSORS,
                  switches=dict(qk_norm="projection"), defaults=dict(norm_topk_prob=False)),
    # Qwen3-MoE's intermediate_size is the width of dense MLP layers, which the supported checkpoints
    # do not have (mlp_only_layers is empty); the experts' width is its moe_intermediate_size
    "qwen3_moe": dict(architecture="Qwen3MoeForCausalLM", tensors=OLMOE_TENSORS,
                      keys={"num_local_experts": "num_experts", "intermediate_size": "moe_intermediate_size",
                            "dense_intermediate_size": "intermediate_size"},
                      switches=dict(qk_norm="head"), defaults=dict(norm_topk_prob=False)),
}
UNSUPPORTED = {  # config.json values of these families whose decoder the model does not build
    "clip_qkv": None, "attention_bias": False, "mlp_only_layers": [], "decoder_sparse_step": 1}


def config_from_json(d: dict) -> MixtralConfig:
    """A config.json's dict, of any family, as a MixtralConfig (ValueError, one line, if it is none of them)."""
    if not isinstance(d, dict):
        raise ValueError(f"not a JSON object but a {type(d).__name__}")
    family = FAMILIES.get(d.get("model_type"))
    if family is None:
        raise ValueError(f"model_type is {d.get('model_type')!r}, not one of {', '.join(map(repr, FAMILIES))}")
    for k, allowed in UNSUPPORTED.items():
        if d.get(k, allowed) != allowed:
            raise ValueError(f"{k} {d[k]!r} is not supported; only {json.dumps(allowed)} is")
    theirs = {v: k for k, v in family["keys"].items()}
    d = {**family["defaults"], **{theirs.get(k, k): v for k, v in d.items()}, **family["switches"]}
    if d["model_type"] == "qwen3_moe" and not d.get("use_sliding_window", False):
        d["sliding_window"] = None  # as transformers' Qwen3MoeConfig: the window applies only when enabled
    return MixtralConfig.from_dict(d)


def config_json(config: MixtralConfig) -> dict:
    """config as its family's config.json: its key names, without the switches its model_type implies."""
    family = FAMILIES[config.model_type]
    d = {k: v for k, v in config.to_dict().items() if k not in family["switches"]}
    d = {family["keys"].get(k, k): v for k, v in d.items()}
    d.setdefault("architectures", [family["architecture"]])
    return d


def file_name(name: str, config: MixtralConfig) -> str:
    """A tensor's name in config's family (Mixtral's names are the model's)."""
    for ours, theirs in FAMILIES[config.model_type]["tensors"]:
        name = name.replace(ours, theirs)
    return name


def model_name(name: str, config: MixtralConfig) -> str:
    """A tensor's name in the model, from its name in config's family."""
    for ours, theirs in FAMILIES[config.model_type]["tensors"]:
        name = name.replace(theirs, ours)
    return name


def expected_shapes(config: MixtralConfig) -> dict:
    """Every tensor name of an official checkpoint (by the model's names) with its shape, from the config alone."""
    h = config.hidden_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for l in range(config.num_hidden_layers):
        shapes.update(layer_shapes(config, l))
    return shapes


def layer_shapes(config: MixtralConfig, l: int) -> dict:
    h, i, d = config.hidden_size, config.intermediate_size, config.dim_head
    p = f"model.layers.{l}."
    s = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (config.num_attention_heads * d, h),
        p + "self_attn.k_proj.weight": (config.num_key_value_heads * d, h),
        p + "self_attn.v_proj.weight": (config.num_key_value_heads * d, h),
        p + "self_attn.o_proj.weight": (h, config.num_attention_heads * d),
        p + "block_sparse_moe.gate.weight": (config.num_local_experts, h),
    }
    if config.qk_norm is not None:  # OLMoE's norms are as wide as the projections, Qwen3-MoE's as a head
        per_head = config.qk_norm == "head"
        s[p + "self_attn.q_norm.weight"] = (d if per_head else config.num_attention_heads * d,)
        s[p + "self_attn.k_norm.weight"] = (d if per_head else config.num_key_value_heads * d,)
    for e in range(config.num_local_experts):
        q = f"{p}block_sparse_moe.experts.{e}."
        s.update({q + "w1.weight": (i, h), q + "w3.weight": (i, h), q + "w2.weight": (h, i)})
    return s


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
DTYPES = {name: getattr(torch, name) for name in cli.DTYPES}  # --dtype's names as torch dtypes
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors' names
SAFETENSORS_DTYPES = {**STORED_DTYPES, "I16": torch.int16}  # and the metadata of sparse24's compressed matrices


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def whole(v) -> bool:
    """A config.json value that is an integer (JSON's true and false are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def number(v) -> bool:
    """A config.json value that is a finite number (true and false are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(config: MixtralConfig) -> MixtralConfig:
    """config, or ValueError (one line) for a value no Mixtral has: a size that is not a positive
    integer, a norm epsilon or RoPE base that is not a positive number."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings"):
        if not (whole(getattr(config, name)) and getattr(config, name) > 0):
            raise ValueError(f"{name} {getattr(config, name)!r} is not a positive integer")
    for name in ("head_dim", "sliding_window"):
        v = getattr(config, name)
        if v is not None and not (whole(v) and v > 0):
            raise ValueError(f"{name} {v!r} is not a positive integer (or null)")
    for name in ("rms_norm_eps", "rope_theta"):
        if not (number(getattr(config, name)) and getattr(config, name) > 0):
            raise ValueError(f"{name} {getattr(config, name)!r} is not a positive number")
    if not isinstance(config.tie_word_embeddings, bool):
        raise ValueError(f"tie_word_embeddings {config.tie_word_embeddings!r} is not true or false")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (Mixtral uses 'silu')")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if not 1 <= config.num_experts_per_tok <= config.num_local_experts:
        raise ValueError("num_experts_per_tok must lie in [1, num_local_experts]")
    if not isinstance(config.norm_topk_prob, bool):
        raise ValueError(f"norm_topk_prob {config.norm_topk_prob!r} is not true or false")
    if config.qk_norm not in (None, "projection", "head"):
        raise ValueError(f"qk_norm {config.qk_norm!r} is not null, 'projection' or 'head'")
    return config


def read_config(path: str) -> MixtralConfig:
    cfg_path = os.path.join(path, "config.json")
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except PermissionError:  # a folder on its way this user may not enter
        raise CheckpointError(f"{path}: permission denied") from None
    except OSError:
        is_dir = False
    if not is_dir:
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{path}: permission denied (cannot read the checkpoint directory)")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except PermissionError:
        raise CheckpointError(f"{cfg_path}: permission denied") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        return check_config(config_from_json(d))
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def refuse_variant(path: str, config: MixtralConfig):
    """An expert-level variant (config.json's dynamic_skip_beta or condensed_layers, written by
    expert_prune.py) runs other MoE blocks than Mixtral's: refused by every script that would run it
    as a plain Mixtral (evaluation honours it, through variants.load_model)."""
    kind = ("NAEE dynamic skipping" if config.extra.get("dynamic_skip_beta") else
            "CD-MoE condensed layers" if config.extra.get("condensed_layers") else None)
    if kind:
        raise CheckpointError(f"{path} is an expert-level variant ({kind}, in config.json) that this script would run "
                              f"as a plain Mixtral; use the checkpoint it was made from (eval_ppl.py evaluates it)")


class CheckpointReader:
    """Lazy, memory-mapped view of a checkpoint directory: nothing is read until asked for.

    Holds only the shards' headers, so a single decoder layer of Mixtral-8x7B (~93 GB) can be
    materialised without touching the rest. On opening it checks, from headers alone, that the
    key set and every shape match the config one for one (as nanoGPT's from_pretrained does) and
    that every tensor is stored as float32, float16 or bfloat16. Every tensor read is checked to
    be finite (a NaN or Inf weight is an error naming it) unless allow_nonfinite.
    """

    def __init__(self, path: str, allow_nonfinite: bool = False, layout: Optional[dict] = None,
                 allow_variants: bool = False):
        self.path, self.allow_nonfinite = path, allow_nonfinite
        self.config = read_config(path)
        if not allow_variants:
            refuse_variant(path, self.config)
        if self.config.extra.get("sparse_format") and layout is None:
            raise CheckpointError(f"{path} stores its 2:4 matrices compressed (config.json's sparse_format); load it "
                                  f"with sparse24.load_compressed, or use the dense checkpoint it was made from")
        # layout: {key: (shape, allowed safetensors dtypes)} for a variant of the official layout
        # (sparse24.py's compressed 2:4 matrices); default: the official keys, shapes and float dtypes
        self.layout = layout or {k: (s, STORED_DTYPES) for k, s in expected_shapes(self.config).items()}
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.weight_map = json.load(f)["weight_map"]
                if not (isinstance(self.weight_map, dict) and all(isinstance(v, str) for v in self.weight_map.values())):
                    raise TypeError("weight_map is not an object of shard file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        elif os.path.isfile(single):
            self.weight_map = None
        else:
            raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
        if self.weight_map is None:
            self.weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        else:
            for shard in sorted(set(self.weight_map.values())):
                # every shard named by the index must exist and hold the keys the index says it does
                keys = set(self._open(shard).keys())
                missing = [k for k, s in self.weight_map.items() if s == shard and k not in keys]
                if missing:
                    raise CheckpointError(f"{shard}: index names {missing[0]} but the shard does not hold it")
        # from here on every tensor goes by the model's (Mixtral's) name; file_keys has the family's
        self.file_keys = {model_name(k, self.config): k for k in self.weight_map}
        self.weight_map = {model_name(k, self.config): s for k, s in self.weight_map.items()}
        self._check_keys()

    def _open(self, shard: str):
        """A fresh handle on a shard. Not cached: a cached handle keeps every page it has read
        mapped, so reading a 93 GB checkpoint layer by layer would grow the resident set."""
        fn = os.path.join(self.path, shard)
        if not os.path.isfile(fn):
            raise CheckpointError(f"{self.path}: missing shard {shard}")
        try:
            return safe_open(fn, framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{fn}: unreadable safetensors file ({str(e).splitlines()[0]})") from None

    def _check_keys(self):
        want = self.layout
        have = set(self.weight_map)
        if self.config.tie_word_embeddings:
            have.discard("lm_head.weight")  # some tied checkpoints still store it; it is the embedding
        missing, unexpected = sorted(set(want) - have), sorted(have - set(want))
        if missing:
            raise CheckpointError(f"{self.path}: missing key {file_name(missing[0], self.config)} ({len(missing)} "
                                  f"missing in all)")
        if unexpected:
            raise CheckpointError(f"{self.path}: unexpected key {self.file_keys[unexpected[0]]} ({len(unexpected)} "
                                  f"unexpected in all)")
        headers = {s: self._open(s) for s in set(self.weight_map.values())}  # headers only: no data is read
        for k, (shape, dtypes) in want.items():
            stored = headers[self.weight_map[k]].get_slice(self.file_keys[k])
            got = tuple(stored.get_shape())
            if got != tuple(shape):
                raise CheckpointError(f"{self.path}: {self.file_keys[k]} has shape {list(got)}, config implies "
                                      f"{list(shape)}")
            if stored.get_dtype() not in dtypes:
                raise CheckpointError(f"{self.path}: {self.file_keys[k]} is stored as {stored.get_dtype()}; only "
                                      f"{', '.join(dtypes)} is supported there")

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype a tensor is stored in (read from the header, not the data)."""
        return SAFETENSORS_DTYPES[self._open(self.weight_map[name]).get_slice(self.file_keys[name]).get_dtype()]

    def stored_dtype(self) -> torch.dtype:
        """The dtype the expert weights are stored in."""
        return self.dtype_of("model.layers.0.block_sparse_moe.experts.0.w1.weight")

    def get(self, name: str, dtype=None, device="cpu") -> torch.Tensor:
        handle = self._open(self.weight_map[name])
        try:
            t = handle.get_tensor(self.file_keys[name])
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read {self.file_keys[name]} ({str(e).splitlines()[0]})") from None
        if not self.allow_nonfinite and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{self.path}: {self.file_keys[name]} has non-finite values (NaN or Inf)")
        return t.to(device=device, dtype=dtype or t.dtype, copy=True)  # never the file's memory map: a write
        # to a weight would copy its pages one fault at a time

    def load_into(self, module: nn.Module, prefix: str, dtype=None, device="cpu"):
        """Fill module's parameters from the tensors named prefix + parameter name."""
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.data = self.get(prefix + name, dtype, device)
        return module


def load_layer(reader: CheckpointReader, l: int, dtype: torch.dtype, device) -> DecoderLayer:
    """Materialise decoder layer l alone (the rest of the checkpoint is not read)."""
    with torch.device("meta"):
        layer = DecoderLayer(reader.config)
    layer = layer.to_empty(device=device)
    return reader.load_into(layer, f"model.layers.{l}.", dtype, device)


def load_embedding(reader: CheckpointReader, dtype=torch.float32, device="cpu") -> nn.Embedding:
    with torch.device("meta"):
        emb = nn.Embedding(reader.config.vocab_size, reader.config.hidden_size)
    return reader.load_into(emb.to_empty(device=device), "model.embed_tokens.", dtype, device)


def load_model(path: str, dtype=torch.float32, device="cpu", allow_nonfinite: bool = False,
               allow_variants: bool = False) -> Mixtral:
    """The whole model from an official-layout checkpoint, computing in `dtype` on `device` (the
    plain Mixtral: an expert-level variant only with allow_variants, for variants.load_model)."""
    reader = CheckpointReader(path, allow_nonfinite, allow_variants=allow_variants)
    with torch.device("meta"):
        model = Mixtral(reader.config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and reader.config.tie_word_embeddings:
                continue  # to_empty() untied it; it is re-tied to the embedding below
            p.data = reader.get(name, dtype, device)
        if reader.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


class CheckpointWriter:
    """Streams tensors into an official-layout checkpoint, a shard at a time.

    Used as `with CheckpointWriter(...) as w:`. Everything goes to a temporary sibling folder
    OUT.tmp-PID-XXXX that becomes `path` only when the block ends without an error (publish);
    on an error, SIGINT or SIGTERM the temporary folder and any parent folders this writer
    created are removed. An existing `path` (folder, file or link) is an error unless overwrite;
    `path` may not be (or contain) any of `inputs`. No tensor with a NaN or Inf is written.
    Shards are named model-0000i-of-0000n.safetensors with model.safetensors.index.json, as the
    official checkpoints are (a single shard is written as model.safetensors).
    """

    def __init__(self, path: str, config: MixtralConfig, overwrite: bool = False, src_dir: Optional[str] = None,
                 max_shard_bytes: int = 2 * 1024**3, inputs=()):  # 2 GB shards: 47 files for Mixtral-8x7B in bf16
        path = os.path.abspath(path)
        check_output(path, overwrite, (src_dir, *inputs))
        self.path, self.config, self.overwrite, self.src_dir = path, config, overwrite, src_dir
        self.max_shard_bytes = max_shard_bytes
        parent, self.created = os.path.dirname(path), []
        missing = parent
        while not os.path.exists(missing):
            self.created.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(parent, exist_ok=True)
            remove_stale_temps(parent, os.path.basename(path))
            self.tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(path)}.tmp-{os.getpid()}-", dir=parent)
        except OSError as e:
            self._remove_created()
            raise CheckpointError(f"cannot create {path} ({e.strerror})") from None
        self.pending, self.pending_bytes, self.shards, self.weight_map, self.total = {}, 0, [], {}, 0
        self.extra_files = {}  # {file name: str, bytes or JSON-able object} written beside the weights by close()

    def add(self, name: str, tensor: torch.Tensor):
        """Stage tensor under its model (Mixtral) name; it is stored under its family's name."""
        name = file_name(name, self.config)
        t = tensor.detach().to("cpu").contiguous()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name} has non-finite values (NaN or Inf); nothing was written")
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def flush(self):
        """Write what is pending as a shard now (layerwise.layers calls this after every layer, so
        that no more than one layer is ever held)."""
        if not self.pending:
            return
        fn = f"shard-{len(self.shards):05d}.safetensors"
        try:
            save_file(self.pending, os.path.join(self.tmp, fn), metadata={"format": "pt"})
        except (OSError, SafetensorError) as e:  # no space left, quota, I/O error
            raise CheckpointError(f"cannot write {self.path} ({str(e).splitlines()[0]})") from None
        self.shards.append(fn)
        self.weight_map.update({k: fn for k in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        """Finish the checkpoint: shard names, index, config.json, tokenizer files, then publish."""
        self.flush()
        n = len(self.shards)
        final = {s: "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                 for i, s in enumerate(self.shards)}
        try:
            for s, f in final.items():
                os.rename(os.path.join(self.tmp, s), os.path.join(self.tmp, f))
            if n > 1:
                index = {"metadata": {"total_size": self.total},
                         "weight_map": {k: final[s] for k, s in sorted(self.weight_map.items())}}
                with open(os.path.join(self.tmp, "model.safetensors.index.json"), "w") as f:
                    json.dump(index, f, indent=2)
            with open(os.path.join(self.tmp, "config.json"), "w") as f:
                json.dump(config_json(self.config), f, indent=2)
            if self.src_dir:
                for fn in TOKENIZER_FILES:
                    if os.path.isfile(os.path.join(self.src_dir, fn)):
                        shutil.copy(os.path.join(self.src_dir, fn), os.path.join(self.tmp, fn))
            for fn, content in self.extra_files.items():
                if isinstance(content, bytes):
                    with open(os.path.join(self.tmp, fn), "wb") as f:
                        f.write(content)
                    continue
                with open(os.path.join(self.tmp, fn), "w") as f:
                    f.write(content if isinstance(content, str) else json.dumps(content, indent=2, allow_nan=False))
            os.chmod(self.tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a checkpoint is an ordinary folder
            for fn in os.listdir(self.tmp):
                os.chmod(os.path.join(self.tmp, fn), 0o666 & ~umask())
        except OSError as e:
            raise CheckpointError(f"cannot write {self.path} ({e.strerror})") from None
        except ValueError as e:  # a report with a NaN
            raise CheckpointError(f"cannot write {self.path}: {e}") from None
        publish(self.tmp, self.path, self.overwrite)

    def abort(self):
        remove(self.tmp)
        self._remove_created()

    def _remove_created(self):
        for d in self.created:  # deepest first; a folder something else has put files in stays
            try:
                os.rmdir(d)
            except OSError:
                break

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def save_model(model: Mixtral, path: str, dtype=None, overwrite=False, src_dir=None, max_shard_bytes=2 * 1024**3,
               extra_files=None, inputs=()):
    """Write model in the official layout (tied lm_head is not stored, as transformers does)."""
    config = model.config
    if dtype is not None:
        config = MixtralConfig.from_dict({**config.to_dict(), "torch_dtype": dtype_name(dtype)})
    with CheckpointWriter(path, config, overwrite, src_dir, max_shard_bytes, inputs) as w:
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            w.add(name, p.to(dtype) if dtype is not None else p)
        w.extra_files.update(extra_files or {})
