"""Hugging Face interop: exact tensors both ways, and the same logits as a Hugging Face-style forward.

The Hugging Face side is built here by hand (no transformers): a tiny Llama folder whose q/k weights
are Meta-layout weights put through Hugging Face's own permutation, as its convert script does.
benchmarks/hf_logits_check.py runs the same comparison against transformers itself.
"""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from minititan.convert import config_from_hf, ffn_settings, hf_to_minititan, minititan_to_hf
from minititan.core import checkpoint as ckpt
from minititan.core import model
from minititan.core.config import Config, ConfigError, Model, UserError, hidden_dim, validate
from minititan.generate import load_for_inference
from tests.harness import train_run

LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def hf_config(scaling=False, tied=False) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 200, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
            "max_position_embeddings": 131072 if scaling else 64, "tie_word_embeddings": tied,
            "rope_scaling": LLAMA31_SCALING if scaling else None, "torch_dtype": "float32"}


def hf_permute(w, n_heads):
    """Hugging Face's convert_llama_weights_to_hf permutation, as written there."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_weights(c: dict, seed=0) -> dict:
    """Random Meta-layout weights under minititan names, shapes from the HF config (not from minititan)."""
    g = torch.Generator().manual_seed(seed)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    shapes = {"tok_embeddings": (v, d), "norm": (d,), "output": (v, d)}
    for i in range(c["num_hidden_layers"]):
        shapes |= {f"layers.{i}.{n}": s for n, s in [
            ("attention_norm", (d,)), ("attention.wq", (d, d)), ("attention.wk", (kv, d)), ("attention.wv", (kv, d)),
            ("attention.wo", (d, d)), ("ffn_norm", (d,)), ("feed_forward.w1", (f, d)), ("feed_forward.w2", (d, f)),
            ("feed_forward.w3", (f, d))]}
    out = {}
    for n, s in shapes.items():
        if len(s) == 1:
            out[n] = 1 + 0.2 * torch.randn(s, generator=g)
        else:
            out[n] = torch.randn(s, generator=g) * (1.0 if n == "tok_embeddings" else s[1] ** -0.5)
    if c["tie_word_embeddings"]:
        out["output"] = out["tok_embeddings"]
    return out


HF_NAMES = {"attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
            "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm", "feed_forward.w1": "mlp.gate_proj",
            "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}


def to_hf_layout(meta: dict, c: dict) -> dict:
    out = {"model.embed_tokens.weight": meta["tok_embeddings"], "model.norm.weight": meta["norm"]}
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = meta["output"]
    for n, t in meta.items():
        if n.startswith("layers."):
            _, i, rest = n.split(".", 2)
            if rest == "attention.wq":
                t = hf_permute(t, c["num_attention_heads"])
            if rest == "attention.wk":
                t = hf_permute(t, c["num_key_value_heads"])
            out[f"model.layers.{i}.{HF_NAMES[rest]}.weight"] = t.contiguous()
    return out


def write_hf_folder(path, c: dict, tensors: dict, shards: int = 1):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(c))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names, weight_map = sorted(tensors), {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def read_safetensors(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---------------------------------------------------------------- a Hugging Face-style forward


def hf_style_logits(t: dict, c: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The causal LMs' math on HF-layout weights: rotate_half RoPE, GQA by repeating kv heads; where the
    weights have them, q/k/v biases (Qwen2) and per-head q/k RMSNorm before RoPE (Qwen3); MoE blocks as
    hf_style_moe."""
    d, H, KV, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd, (b, s) = c.get("head_dim") or d // H, tokens.shape
    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    if c.get("rope_scaling"):  # transformers' _compute_llama3_parameters, restated
        r = c["rope_scaling"]
        old, low, high, factor = (r["original_max_position_embeddings"], r["low_freq_factor"], r["high_freq_factor"],
                                  r["factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    mask = torch.full((s, s), -float("inf")).triu(1)
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(c["num_hidden_layers"]):
        p = lambda n: t[f"model.layers.{i}.{n}.weight"]  # noqa: E731

        def proj(name, heads, h):
            y = h @ p(f"self_attn.{name}_proj").T + t.get(f"model.layers.{i}.self_attn.{name}_proj.bias", 0)
            y = y.view(b, s, heads, hd)
            norm = t.get(f"model.layers.{i}.self_attn.{name}_norm.weight")
            return (y if norm is None else rms(y, norm)).transpose(1, 2)

        h = rms(x, p("input_layernorm"))
        q, k, v = rope(proj("q", H, h)), rope(proj("k", KV, h)), proj("v", KV, h)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + att.transpose(1, 2).reshape(b, s, H * hd) @ p("self_attn.o_proj").T
        h = rms(x, p("post_attention_layernorm"))
        if f"model.layers.{i}.mlp.gate_proj.weight" in t:
            x = x + (F.silu(h @ p("mlp.gate_proj").T) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
        else:
            x = x + hf_style_moe(t, c, i, h)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return rms(x, t["model.norm.weight"]) @ head.T


def hf_style_moe(t: dict, c: dict, i: int, h: torch.Tensor) -> torch.Tensor:
    """A MoE block of Mixtral (as Mistral's reference code writes it: the top-k router logits, then a
    softmax over those k) or Qwen (softmax over all experts, top-k, renormalized if norm_topk_prob; Qwen2:
    plus a shared expert scaled by sigmoid(h @ shared_expert_gate)), one token at a time."""
    mixtral = c["model_type"] == "mixtral"
    pre = f"model.layers.{i}." + ("block_sparse_moe" if mixtral else "mlp")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")

    def swiglu(x, prefix):
        gate, up, down = (t[f"{prefix}.{n}.weight"] for n in names)
        return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T

    out = torch.zeros_like(h)
    for token in itertools.product(range(h.shape[0]), range(h.shape[1])):
        x = h[token]
        logits = t[f"{pre}.gate.weight"] @ x
        if mixtral:
            top, chosen = logits.topk(c["num_experts_per_tok"])
            weights = top.softmax(-1)
        else:
            weights, chosen = logits.softmax(-1).topk(c["num_experts_per_tok"])
            weights = weights / weights.sum() if c.get("norm_topk_prob") else weights
        out[token] = sum(w * swiglu(x, f"{pre}.experts.{e}") for w, e in zip(weights, chosen.tolist()))
        if f"{pre}.shared_expert_gate.weight" in t:
            gate = torch.sigmoid(t[f"{pre}.shared_expert_gate.weight"] @ x)
            out[token] += gate * ((F.silu(x @ t[f"{pre}.shared_expert.gate_proj.weight"].T) * (
                x @ t[f"{pre}.shared_expert.up_proj.weight"].T)) @ t[f"{pre}.shared_expert.down_proj.weight"].T)
    return out


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("tied,shards", [(False, 1), (True, 3)])
def test_hf_to_minititan_is_exact(tmp_path, tied, shards):
    c = hf_config(tied=tied)
    meta = meta_weights(c)
    hf = write_hf_folder(tmp_path / "hf", c, to_hf_layout(meta, c), shards)
    (hf / "tokenizer.json").write_text("{}")
    path = hf_to_minititan(hf, tmp_path / "mt")
    assert path == tmp_path / "mt" / "step-00000000"
    loaded = ckpt.Checkpoint(path)
    assert sorted(loaded.names()) == sorted(meta)
    for n, t in meta.items():
        assert torch.equal(loaded.read(n), t), n
    cfg, _ = load_for_inference(path)
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, hidden_dim(m)) == (64, 2, 4, 2, 256, 200)
    assert (m.norm_eps, m.rope_theta, m.rope_scaling, m.max_seq_len) == (1e-5, 500000.0, False, 64)
    assert cfg.data.tokenizer == str((tmp_path / "mt" / "tokenizer.json").resolve())  # generate uses the copy
    assert (tmp_path / "mt" / "config.toml").read_text() == ckpt.Checkpoint(path).manifest.config


def test_round_trip_minititan_hf_minititan(tmp_path):
    c = hf_config(scaling=True)
    hf_tensors = to_hf_layout(meta_weights(c), c)
    first = hf_to_minititan(write_hf_folder(tmp_path / "hf", c, hf_tensors), tmp_path / "mt")
    out = minititan_to_hf(tmp_path / "mt", tmp_path / "hf2")  # a folder of checkpoints: its newest
    written = read_safetensors(out / "model.safetensors")
    assert written.keys() == hf_tensors.keys()
    assert all(torch.equal(written[n], hf_tensors[n]) for n in written)
    config = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "torch_dtype"):
        assert config[key] == c[key], key
    again = ckpt.Checkpoint(hf_to_minititan(out, tmp_path / "mt2"))
    first = ckpt.Checkpoint(first)
    assert all(torch.equal(again.read(n), first.read(n)) for n in first.names())


def test_bf16_keeps_its_dtype(tmp_path):
    c = hf_config() | {"torch_dtype": "bfloat16"}
    hf_tensors = {n: t.bfloat16() for n, t in to_hf_layout(meta_weights(c), c).items()}
    path = hf_to_minititan(write_hf_folder(tmp_path / "hf", c, hf_tensors), tmp_path / "mt")
    assert ckpt.Checkpoint(path).read("layers.0.attention.wq").dtype == torch.bfloat16
    out = minititan_to_hf(path, tmp_path / "hf2")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    written = read_safetensors(out / "model.safetensors")
    assert all(torch.equal(written[n], hf_tensors[n]) for n in written)


@pytest.mark.parametrize("scaling", [False, True])
def test_logits_match_hf_style_forward(tmp_path, scaling):
    c = hf_config(scaling=scaling, tied=scaling)
    hf_tensors = to_hf_layout(meta_weights(c), c)
    cfg, params = load_for_inference(hf_to_minititan(write_hf_folder(tmp_path / "hf", c, hf_tensors), tmp_path / "mt"))
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = model.forward(params, tokens, cfg.model)
    ref = hf_style_logits(hf_tensors, c, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    other = hf_style_logits(hf_tensors, c | {"rope_scaling": None if scaling else LLAMA31_SCALING}, tokens)
    assert (other - ref).abs().max() > 1e-3  # the scaling is visible at these lengths, so the check has teeth


def test_train_starts_from_converted_checkpoint(tmp_path):
    c = hf_config()
    hf_tensors = to_hf_layout(meta_weights(c), c)
    path = hf_to_minititan(write_hf_folder(tmp_path / "hf", c, hf_tensors), tmp_path / "mt")
    cfg, params = load_for_inference(path)
    m = cfg.model
    model_args = [f"model.ffn_dim_multiplier={m.ffn_dim_multiplier!r}", f"model.multiple_of={m.multiple_of}",
                  "model.rope_theta=500000.0", "model.vocab_size=256"]
    rows, _ = train_run(tmp_path, 1, model_args + [f"checkpoint.load_path={path}", "training.steps=1",
                                                    "checkpoint.enable=false"])
    from minititan.core.data import TokenSource
    inputs, labels = TokenSource("shakespeare", 256).batch(0, 1, 8, 32)
    expected = model.loss_sum(params, inputs, labels, m).item() / labels.numel()
    assert abs(rows[0]["loss"] - expected) / expected < 1e-5


def test_ffn_settings_land_on_intermediate_size():
    for dim, size in [(4096, 14336), (8192, 28672), (16384, 53248), (2048, 8192), (3072, 8192), (64, 200), (64, 1)]:
        mult, multiple_of = ffn_settings(dim, size)
        assert hidden_dim(Model(dim=dim, ffn_dim_multiplier=mult, multiple_of=multiple_of)) == size


def test_clear_errors(tmp_path):
    c = hf_config()
    hf_tensors = to_hf_layout(meta_weights(c), c)
    with pytest.raises(UserError, match="not a folder"):
        hf_to_minititan(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json not found"):
        hf_to_minititan(tmp_path / "empty", tmp_path / "out")
    mistral = write_hf_folder(tmp_path / "mistral", c | {"model_type": "mistral"}, hf_tensors)
    with pytest.raises(UserError, match="only Llama"):
        hf_to_minititan(mistral, tmp_path / "out")
    yarn = write_hf_folder(tmp_path / "yarn", c | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, hf_tensors)
    with pytest.raises(UserError, match="RoPE scaling 'yarn'"):
        hf_to_minititan(yarn, tmp_path / "out")
    missing = {n: t for n, t in hf_tensors.items() if n != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(UserError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        hf_to_minititan(write_hf_folder(tmp_path / "missing", c, missing), tmp_path / "out")
    untied = {n: t for n, t in hf_tensors.items() if n != "lm_head.weight"}
    with pytest.raises(UserError, match="no tensor 'lm_head.weight'"):
        hf_to_minititan(write_hf_folder(tmp_path / "untied", c, untied), tmp_path / "out")
    extra = hf_tensors | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(UserError, match="q_proj.bias"):
        hf_to_minititan(write_hf_folder(tmp_path / "extra", c, extra), tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        minititan_to_hf(tmp_path / "no-checkpoint", tmp_path / "out")


# ---------------------------------------------------------------- Llama 3 RoPE scaling, any factor

LLAMA32_SCALING = LLAMA31_SCALING | {"factor": 32.0}


def llama3_frequency_by_hand(i: int, hd: int, theta: float, factor: float, low: float, high: float,
                             old_context: int) -> float:
    """One pair's frequency, Llama 3's rule case by case: short wavelengths (many turns within the
    pre-training context) stay, long ones slow down by factor, those between blend linearly in context/wavelength."""
    freq = theta ** (-2 * i / hd)
    turns = old_context * freq / (2 * math.pi)  # = old_context / wavelength
    if turns > high:
        return freq
    if turns < low:
        return freq / factor
    smooth = (turns - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq


def test_factor_32_frequencies_match_hand_computation():
    """Llama 3.2 1B's head (dim 2048 / 32 heads = 64, theta 500000) with factor 32, and odd settings."""
    for factor, low, high, old_context in [(32.0, 1.0, 4.0, 8192), (8.0, 1.0, 4.0, 8192), (16.0, 2.0, 8.0, 4096)]:
        cfg = Model(dim=2048, n_heads=32, rope_theta=500000.0, rope_scaling=True, rope_scaling_factor=factor,
                    rope_low_freq_factor=low, rope_high_freq_factor=high, rope_original_context=old_context)
        expected = torch.tensor([llama3_frequency_by_hand(i, 64, 500000.0, factor, low, high, old_context)
                                 for i in range(32)], dtype=torch.float64)
        plain = 500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
        kept, slowed = torch.isclose(expected, plain, rtol=1e-12), torch.isclose(expected, plain / factor, rtol=1e-12)
        assert kept.any() and slowed.any() and not (kept | slowed).all()  # all three bands are present
        freqs = model.rope_frequencies(cfg)
        torch.testing.assert_close(freqs, expected, rtol=1e-12, atol=0)
        positions = torch.tensor([0, 1, 5000, 100000])
        angles = positions.double()[:, None] * expected[None]  # the table the blocks use, from the same fields
        torch.testing.assert_close(torch.view_as_complex(model.rope_table(cfg, positions)),
                                   torch.polar(torch.ones_like(angles), angles).to(torch.complex64))


def test_bad_rope_scaling_settings_are_refused():
    for bad in [{"rope_scaling_factor": 0.5}, {"rope_low_freq_factor": 4.0}, {"rope_original_context": 0}]:
        with pytest.raises(ConfigError, match="rope_scaling needs"):
            validate(Config(model=Model(rope_scaling=True, **bad)))
    validate(Config(model=Model(rope_scaling=False, rope_low_freq_factor=4.0)))  # unused when scaling is off


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_factor_32_round_trip_and_logits(tmp_path, style):
    """A Llama 3.2-style rope_scaling (factor 32) converts, computes HF's logits and is written back unchanged."""
    c = hf_config(scaling=True) | {"rope_scaling": LLAMA32_SCALING}
    hf_tensors = to_hf_layout(meta_weights(c), c)
    on_disk = c
    if style == "transformers5":  # rope_parameters holds theta and scaling; the old keys are gone
        on_disk = {k: v for k, v in c.items() if k not in ("rope_theta", "rope_scaling")}
        on_disk["rope_parameters"] = LLAMA32_SCALING | {"rope_theta": c["rope_theta"]}
    path = hf_to_minititan(write_hf_folder(tmp_path / "hf", on_disk, hf_tensors), tmp_path / "mt")
    cfg, params = load_for_inference(path)
    m = cfg.model
    assert (m.rope_theta, m.rope_scaling, m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor,
            m.rope_original_context) == (500000.0, True, 32.0, 1.0, 4.0, 8192)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = hf_style_logits(hf_tensors, c, tokens)
    torch.testing.assert_close(model.forward(params, tokens, m), ref, rtol=1e-5, atol=1e-5)
    factor_8 = hf_style_logits(hf_tensors, c | {"rope_scaling": LLAMA31_SCALING}, tokens)
    assert (factor_8 - ref).abs().max() > 1e-3  # factor 32 is not factor 8 at these lengths
    out = minititan_to_hf(path, tmp_path / "hf2")
    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"] == LLAMA32_SCALING and written["rope_theta"] == 500000.0
    assert config_from_hf(written).model == m


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"type": "dynamic", "factor": 2.0},
                                  {"rope_type": "linear", "factor": 2.0}, {"rope_type": "longrope"}])
def test_unknown_rope_type_is_refused(rope):
    for hf in (hf_config() | {"rope_scaling": rope}, hf_config() | {"rope_parameters": rope | {"rope_theta": 1e4}}):
        with pytest.raises(ValueError, match=f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}.*\"llama3\""):
            config_from_hf(hf)


def test_incomplete_llama3_rope_scaling_is_refused():
    partial = {k: v for k, v in LLAMA32_SCALING.items() if k != "low_freq_factor"}
    with pytest.raises(ConfigError, match="no number for low_freq_factor"):
        config_from_hf(hf_config() | {"rope_scaling": partial})
    with pytest.raises(ConfigError, match="rope_scaling needs"):  # high <= low would divide by zero
        config_from_hf(hf_config() | {"rope_scaling": LLAMA32_SCALING | {"high_freq_factor": 1.0}})


# ---------------------------------------------------------------- mixture-of-experts families

# The architecture keys of the public config.json files the shipped configs take their dims from
PUBLIC_CONFIGS = {
    "mixtral_8x7b": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "rms_norm_eps": 1e-5,
                     "rope_theta": 1e6, "max_position_embeddings": 32768, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "sliding_window": None, "hidden_act": "silu", "tie_word_embeddings": False},
    "qwen3_30b_a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                      "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 40960, "num_experts": 128,
                      "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
                      "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
                      "use_sliding_window": False, "sliding_window": None, "hidden_act": "silu"},
    "qwen1_5_moe_a2_7b": {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 8192,
                          "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "decoder_sparse_step": 1,
                          "use_sliding_window": False, "sliding_window": 32768, "hidden_act": "silu"},
}
ARCHITECTURE = ("name", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "qk_norm", "qkv_bias", "vocab_size",
                "norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "moe_frequency", "n_dense_layers", "n_experts",
                "top_k", "moe_hidden_dim", "n_shared_experts", "shared_expert_gate", "score_func", "route_norm",
                "route_scale")


@pytest.mark.parametrize("name", list(PUBLIC_CONFIGS))
def test_public_configs_convert_to_the_shipped_ones(name):
    from minititan.core.config import load_config
    converted, shipped = config_from_hf(PUBLIC_CONFIGS[name]).model, load_config(f"configs/{name}.toml").model
    assert {k: getattr(converted, k) for k in ARCHITECTURE} == {k: getattr(shipped, k) for k in ARCHITECTURE}
    assert hidden_dim(converted) == hidden_dim(shipped)


TINY_MOE = dict(name="moe", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64, n_experts=4,
                top_k=2, moe_hidden_dim=32)
FAMILY_MODELS = {
    "mixtral": Model(**TINY_MOE, route_norm=True),
    "qwen3_moe": Model(**TINY_MOE, qk_norm=True, head_dim=32, n_dense_layers=1),
    "qwen2_moe": Model(**TINY_MOE, qkv_bias=True, n_shared_experts=2, shared_expert_gate=True, moe_frequency=2),
}


def save_random_checkpoint(folder, m: Model):
    from minititan.core.config import config_to_toml
    g = torch.Generator().manual_seed(0)
    params = {n: (torch.zeros(s) if n.endswith("expert_bias") else torch.randn(s, generator=g))
              for n, s in model.param_shapes(m).items()}
    text = config_to_toml(Config(model=m))
    return ckpt.save(folder, 0, {n: (t, ckpt.full_slice(t.shape)) for n, t in params.items()}, config=text), params


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_moe_round_trip_is_exact(tmp_path, family):
    """minititan -> Hugging Face -> minititan gives every tensor back bit for bit; the experts are written
    one tensor per expert, under the family's names."""
    m = FAMILY_MODELS[family]
    path, params = save_random_checkpoint(tmp_path / "mt", m)
    out = minititan_to_hf(path, tmp_path / "hf")
    written = read_safetensors(out / "model.safetensors")
    layer, expert = {"mixtral": (2, "model.layers.2.block_sparse_moe.experts.3.w2.weight"),
                     "qwen3_moe": (2, "model.layers.2.mlp.experts.3.down_proj.weight"),
                     "qwen2_moe": (1, "model.layers.1.mlp.experts.3.down_proj.weight")}[family]
    assert torch.equal(written[expert], params[f"layers.{layer}.moe.experts.w2"][3])
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    back = ckpt.Checkpoint(hf_to_minititan(out, tmp_path / "mt2"))
    assert sorted(back.names()) == sorted(params)
    for n, t in params.items():
        assert torch.equal(back.read(n), t), n


def test_moe_exports_refused_with_the_reason(tmp_path):
    plain = Model(**TINY_MOE)  # route_norm false, no shared experts, no q/k norms: no family computes it
    path, _ = save_random_checkpoint(tmp_path / "plain", plain)
    with pytest.raises(UserError, match="Mixtral needs model.route_norm = true; Qwen3-MoE needs model.qk_norm = true"):
        minititan_to_hf(path, tmp_path / "out")
    path, params = save_random_checkpoint(tmp_path / "biased", FAMILY_MODELS["mixtral"])
    c = ckpt.Checkpoint(path)
    tensors = {n: (c.read(n) + (n.endswith("expert_bias")), ckpt.full_slice(t.shape)) for n, t in params.items()}
    path = ckpt.save(tmp_path / "biased2", 0, tensors, config=c.manifest.config)
    with pytest.raises(UserError, match="layers.0.moe.expert_bias is not zero.*bias_update_rate = 0"):
        minititan_to_hf(path, tmp_path / "out")
    with pytest.raises(UserError, match="sliding-window"):
        config_from_hf(PUBLIC_CONFIGS["mixtral_8x7b"] | {"sliding_window": 4096})
    with pytest.raises(UserError, match="mlp_only_layers \\[2\\]"):
        config_from_hf(PUBLIC_CONFIGS["qwen3_30b_a3b"] | {"mlp_only_layers": [2]})
    with pytest.raises(UserError, match="not a multiple of moe_intermediate_size"):
        config_from_hf(PUBLIC_CONFIGS["qwen1_5_moe_a2_7b"] | {"shared_expert_intermediate_size": 2000})


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_moe_logits_match_hf_style_forward(tmp_path, family):
    """Each family exported from minititan computes, under Hugging Face's math written out above
    (Mixtral routed as Mistral's code does it: softmax over the top-k logits), the logits minititan does."""
    m = FAMILY_MODELS[family]
    path, params = save_random_checkpoint(tmp_path / "mt", m)
    params = {n: t * (0.2 if t.dim() == 1 else t.shape[-1] ** -0.5) + (n.endswith("norm")) for n, t in params.items()}
    path = ckpt.save(tmp_path / "scaled", 0, {n: (t, ckpt.full_slice(t.shape)) for n, t in params.items()},
                     config=ckpt.Checkpoint(path).manifest.config)
    out = minititan_to_hf(path, tmp_path / "hf")
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = hf_style_logits(read_safetensors(out / "model.safetensors"), json.loads((out / "config.json").read_text()),
                          tokens)
    torch.testing.assert_close(model.forward(params, tokens, m), ref, rtol=1e-5, atol=1e-5)
