"""mini_mixtral.py against transformers' MixtralForCausalLM, and checkpoint I/O."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import mini_mixtral as mm
import outputs
from conftest import random_model, write_checkpoint

transformers = pytest.importorskip("transformers")


def hf_logits(path, idx):
    hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("overrides", [
    dict(sliding_window=7),  # GQA (8 query heads, 2 kv heads) + a window shorter than the sequence
    dict(num_key_value_heads=8, tie_word_embeddings=True, num_experts_per_tok=1),  # MHA, tied, top-1
    dict(head_dim=16, num_local_experts=8, rope_theta=500.0),  # head_dim given explicitly (8 * 16 != 64)
])
def test_logits_match_transformers(tmp_path, overrides):
    path = write_checkpoint(tmp_path / "ck", **overrides)
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = checkpoint.load_model(path)(idx)
    theirs = hf_logits(path, idx)
    assert ours.abs().max() > 1.0  # non-trivial logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_sliding_window_changes_the_output():
    """The parity above could pass with the window ignored if it never mattered: check it does."""
    m = random_model()
    idx = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(idx)
        m.config.sliding_window = 5
        windowed = m(idx)
    assert torch.equal(full[:, :5], windowed[:, :5])  # the first W positions see everything either way
    assert (full[:, 5:] - windowed[:, 5:]).abs().max() > 1e-3


def test_loads_a_checkpoint_written_by_transformers(tmp_path):
    cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     max_position_embeddings=64, rope_theta=10000.0)
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        assert (checkpoint.load_model(str(tmp_path / "hf"))(idx) - hf(idx).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_round_trip_is_bitwise(tmp_path, dtype):
    m = random_model()
    a = write_checkpoint(tmp_path / "a", m, dtype=dtype)
    loaded = checkpoint.load_model(a, dtype=dtype)
    b = write_checkpoint(tmp_path / "b", loaded, dtype=dtype)
    for name, p in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p.to(dtype)), name
    ra, rb = checkpoint.CheckpointReader(a), checkpoint.CheckpointReader(b)
    assert ra.weight_map == rb.weight_map and len(set(ra.weight_map.values())) > 1  # really sharded
    assert ra.stored_dtype() == dtype
    assert json.load(open(os.path.join(a, "config.json"))) == json.load(open(os.path.join(b, "config.json")))
    assert json.load(open(os.path.join(a, "model.safetensors.index.json")))["metadata"]["total_size"] > 0


def test_compute_dtype_is_the_callers(ckpt):
    m = checkpoint.load_model(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_load_layer_reads_only_that_layer(ckpt, monkeypatch):
    reader = checkpoint.CheckpointReader(ckpt)
    read = []
    orig = reader.get
    monkeypatch.setattr(reader, "get", lambda name, *a, **k: read.append(name) or orig(name, *a, **k))
    layer = checkpoint.load_layer(reader, 1, torch.float32, "cpu")
    assert read and all(n.startswith("model.layers.1.") for n in read)
    full = checkpoint.load_model(ckpt)
    for name, p in layer.state_dict().items():
        assert torch.equal(p, full.state_dict()["model.layers.1." + name])


def test_layer_runs_alone_like_inside_the_model(ckpt):
    full = checkpoint.load_model(ckpt)
    reader = checkpoint.CheckpointReader(ckpt)
    idx = torch.randint(0, 300, (2, 16))
    cos, sin = mm.rope_cos_sin(reader.config, 16)
    x = checkpoint.load_embedding(reader)(idx)
    for l in range(reader.config.num_hidden_layers):
        x, _ = checkpoint.load_layer(reader, l, torch.float32, "cpu")(x, cos, sin)
    with torch.no_grad():
        ref = full.lm_head(full.model.norm(x))
        assert torch.equal(ref, full(idx))


def test_router_is_eq2():
    logits = torch.randn(50, 8)
    w, e = mm.route(logits, 2)
    top = torch.topk(logits, 2, dim=-1)
    assert torch.equal(e, top.indices)
    assert torch.allclose(w, torch.softmax(top.values, dim=-1), atol=1e-6)  # softmax over the top-k only
    assert torch.allclose(w.sum(-1), torch.ones(50))


def test_observer_sees_every_routed_token_once_and_reproduces_the_output():
    m = random_model()
    block = m.model.layers[0].block_sparse_moe
    x = torch.randn(2, 10, 64)
    calls = []
    with torch.no_grad():
        out, _ = block(x, observer=calls.append)
        rebuilt = torch.zeros(20, 64)
        for c in calls:
            assert torch.equal(c.h, block.experts[c.expert].hidden(c.x))
            assert torch.equal(c.x, x.reshape(20, 64)[c.tokens])
            rebuilt.index_add_(0, c.tokens, c.y * c.gate[:, None])
    counts = torch.bincount(torch.cat([c.tokens for c in calls]), minlength=20)
    assert torch.equal(counts, torch.full((20,), 2))  # top-2: each token reaches exactly two experts
    assert torch.allclose(rebuilt, out.reshape(20, 64), atol=1e-6)


# --- bad checkpoints: one-line errors --------------------------------------------------------


def error_of(path):
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.CheckpointReader(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_error_missing_directory_and_config(tmp_path, ckpt):
    assert "no such checkpoint directory" in error_of(tmp_path / "nope")
    os.remove(os.path.join(ckpt, "config.json"))
    assert "no config.json" in error_of(ckpt)


def test_error_not_mixtral(ckpt):
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(ckpt, "config.json"), "w"))
    assert "model_type is 'llama', not one of 'mixtral', 'olmoe', 'qwen3_moe'" in error_of(ckpt)


def test_error_missing_shard_and_weights(ckpt):
    shard = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(ckpt, shard))
    assert f"missing shard {shard}" in error_of(ckpt)
    for f in os.listdir(ckpt):
        if f.startswith("model"):
            os.remove(os.path.join(ckpt, f))
    assert "neither model.safetensors nor model.safetensors.index.json" in error_of(ckpt)


def test_error_unreadable_safetensors(tmp_path):
    path = write_checkpoint(tmp_path / "ck", max_shard_bytes=10**9)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage" * 10)
    assert "unreadable safetensors file" in error_of(path)


def single_file_checkpoint(tmp_path, edit):
    path = write_checkpoint(tmp_path / "ck", max_shard_bytes=10**9)
    sd = checkpoint.load_model(path).state_dict()
    edit(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    return path


def test_error_missing_unexpected_and_misshapen_keys(tmp_path):
    p = single_file_checkpoint(tmp_path / "a", lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    assert "missing key model.layers.1.block_sparse_moe.experts.3.w2.weight" in error_of(p)
    p = single_file_checkpoint(tmp_path / "b", lambda sd: sd.update({"model.layers.9.foo.weight": torch.zeros(2)}))
    assert "unexpected key model.layers.9.foo.weight" in error_of(p)
    p = single_file_checkpoint(tmp_path / "c", lambda sd: sd.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)}))
    assert "model.layers.0.self_attn.k_proj.weight has shape [8, 64], config implies [16, 64]" in error_of(p)


def test_writer_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, ckpt):
    m = checkpoint.load_model(ckpt)
    with pytest.raises(outputs.OutputError, match="exists"):
        checkpoint.save_model(m, ckpt)
    out = tmp_path / "out"
    w = checkpoint.CheckpointWriter(str(out), m.config)
    w.add("model.embed_tokens.weight", m.model.embed_tokens.weight)
    w.abort()  # what an interrupted run does
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith("out")]
