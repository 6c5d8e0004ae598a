"""Hugging Face interop: convert Llama 3 checkpoints between Hugging Face's format and minititan's.

    hf_to_minititan("Llama-3.1-8B/", "converted/")   # -> converted/step-00000000 (+ config.toml)
    minititan_to_hf("outputs/checkpoints/step-00001000", "hf-out/")  # -> hf-out/config.json, model.safetensors

Besides the parameter names, two things differ between the formats:

  * The RoPE layout. Meta's code (and minititan's `apply_rope`) rotates consecutive pairs
    (x0, x1), (x2, x3), ... of each head. Hugging Face rotates the first half of a head against its
    second half (`rotate_half`): pairs (x_i, x_{i + head_dim/2}). The two compute the same attention
    if the rows of wq and wk are reordered inside each head, Meta row 2i + j <-> HF row j * head_dim/2 + i:
    q.k is a sum over the head dim, so permuting q and k the same way leaves it unchanged, and wv, wo
    need no change at all.
  * The feed-forward width. Hugging Face stores `intermediate_size`; minititan derives the width from
    `ffn_dim_multiplier` and `multiple_of` (config.hidden_dim), so we pick a pair that lands on it.

Both directions hold the whole model in CPU memory once (as the source dtype; loaders cast).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minititan.core import checkpoint as ckpt
from minititan.core.config import (Config, ConfigError, Job, Model, Training, UserError, config_to_toml, hidden_dim,
                                   validate)
from minititan.core.model import param_shapes

# Hugging Face's "llama3" RoPE scaling keys -> the model fields that carry them (used when model.rope_scaling)
LLAMA3_ROPE_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                    "high_freq_factor": "rope_high_freq_factor",
                    "original_max_position_embeddings": "rope_original_context"}

_LAYER_NAMES = {  # minititan name inside layers.{i} -> Hugging Face name inside model.layers.{i}
    "attention_norm": "input_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def hf_name(name: str) -> str:
    """minititan name -> Hugging Face name: layers.3.attention.wq -> model.layers.3.self_attn.q_proj.weight."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{_LAYER_NAMES[rest]}.weight"
    return _TOP_NAMES[name] + ".weight"


# ---------------------------------------------------------------- the RoPE permutation


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of wq/wk inside each head: row 2i + j (pair i, member j) goes to j * head_dim/2 + i.
    This is the permutation of Hugging Face's convert_llama_weights_to_hf."""
    return w.unflatten(0, (n_heads, -1, 2)).transpose(1, 2).flatten(0, 2)


def hf_to_meta_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse: view each head as [2 halves, head_dim/2] and interleave the halves back into pairs."""
    return w.unflatten(0, (n_heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def _rope_heads(name: str, m: Model) -> int | None:
    """How many heads a weight's rows hold, if RoPE rotates its outputs (wq, wk); else None."""
    if name.endswith("attention.wq"):
        return m.n_heads
    if name.endswith("attention.wk"):
        return m.n_kv_heads
    return None


# ---------------------------------------------------------------- Hugging Face -> minititan


def hf_to_minititan(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a Hugging Face Llama folder (config.json + model.safetensors, or shards with
    model.safetensors.index.json) into a minititan checkpoint at out_dir/step-00000000.

    Also writes out_dir/config.toml (the config, for `minititan train -c`) and copies tokenizer.json
    when the folder has one, pointing data.tokenizer at the copy. Returns the checkpoint path."""
    hf, out = Path(hf_dir), Path(out_dir)
    if not hf.is_dir():
        raise UserError(f"{hf} is not a folder: pass a Hugging Face model folder (config.json + *.safetensors)")
    hf_cfg = _read_json(hf / "config.json", "the model's config.json")
    cfg = config_from_hf(hf_cfg, hf.name)
    hf_tensors = read_hf_tensors(hf)
    params = {}
    for name, shape in param_shapes(cfg.model).items():
        t = _hf_tensor(hf_tensors, name, bool(hf_cfg.get("tie_word_embeddings")), hf)
        if tuple(t.shape) != shape:
            raise UserError(f"{hf_name(name)} has shape {list(t.shape)} but config.json implies {list(shape)}: "
                            f"config.json and the weights in {hf} do not match")
        heads = _rope_heads(name, cfg.model)
        params[name] = hf_to_meta_rope(t, heads) if heads else t
    _check_all_used(hf_tensors, {hf_name(n) for n in params}, hf)
    out.mkdir(parents=True, exist_ok=True)
    if (hf / "tokenizer.json").is_file():
        shutil.copyfile(hf / "tokenizer.json", out / "tokenizer.json")
        cfg.data.tokenizer = str((out / "tokenizer.json").resolve())
    text = config_to_toml(cfg)
    (out / "config.toml").write_text(text)
    return ckpt.save(out, 0, {n: (t, ckpt.full_slice(t.shape)) for n, t in params.items()}, config=text)


def config_from_hf(hf: dict, source: str = "a Hugging Face model") -> Config:
    """A minititan Config whose model section is the Llama described by a Hugging Face config.json."""
    if hf.get("model_type") != "llama":
        raise UserError(f"config.json has model_type {hf.get('model_type')!r}: only Llama checkpoints "
                        f"(model_type \"llama\") convert")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise UserError(f"config.json has no {key!r}: it is not a complete Llama config")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError("config.json asks for a non-silu activation or bias terms: minititan's Llama has "
                        "SwiGLU and no biases, so this model does not convert")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise UserError(f"config.json has head_dim {hf['head_dim']} but minititan's head dim is hidden_size / "
                        f"num_attention_heads = {dim // n_heads}: this model does not convert")
    ffn_dim_multiplier, multiple_of = ffn_settings(dim, hf["intermediate_size"])
    max_seq_len = hf.get("max_position_embeddings", 2048)
    model = Model(name="llama3", dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=hf["vocab_size"],
                  ffn_dim_multiplier=ffn_dim_multiplier, multiple_of=multiple_of,
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=max_seq_len, **_rope_from_hf(hf))
    cfg = Config(job=Job(description=f"converted from Hugging Face {source}"), model=model,
                 training=Training(seq_len=min(Training().seq_len, max_seq_len)))
    validate(cfg)
    return cfg


def ffn_settings(dim: int, intermediate_size: int) -> tuple[float, int]:
    """(ffn_dim_multiplier, multiple_of) with hidden_dim == intermediate_size exactly: the multiplier makes
    the unrounded width int(multiplier * base) = intermediate_size (the extra half keeps float error
    from truncating it to one less), and rounding up to a multiple of itself leaves it as it is."""
    base = int(2 * 4 * dim / 3)
    return (intermediate_size + 0.5) / base, intermediate_size


def _rope_from_hf(hf: dict) -> dict:
    """The model's rope_* fields from either config style: transformers 4 (rope_theta + rope_scaling)
    or transformers 5 (rope_parameters holding both)."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    fields = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return fields | {"rope_scaling": False}
    if kind != "llama3":
        raise ConfigError(f"config.json uses RoPE scaling {kind!r}: minititan implements only Llama 3's \"llama3\" "
                          f"scaling (or none), so this model does not convert")
    missing = [key for key in LLAMA3_ROPE_KEYS if not isinstance(rope.get(key), (int, float))]
    if missing:
        raise ConfigError(f"config.json's llama3 RoPE scaling has no number for {', '.join(missing)}: it needs "
                          f"{', '.join(LLAMA3_ROPE_KEYS)} (Llama 3.1: 8, 1, 4, 8192)")
    scaling = {field: float(rope[key]) for key, field in LLAMA3_ROPE_KEYS.items()}
    return fields | scaling | {"rope_scaling": True, "rope_original_context": int(scaling["rope_original_context"])}


def read_hf_tensors(hf: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards its index lists."""
    index, single = hf / "model.safetensors.index.json", hf / "model.safetensors"
    if index.is_file():
        files = sorted({hf / f for f in _read_json(index, "the shard index").get("weight_map", {}).values()})
    elif single.is_file():
        files = [single]
    else:
        raise UserError(f"{hf} has neither model.safetensors nor model.safetensors.index.json: only safetensors "
                        f"checkpoints convert (re-save a .bin model with save_pretrained(safe_serialization=True))")
    tensors = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{file} is listed in model.safetensors.index.json but missing: download all shards")
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors |= {key: f.get_tensor(key) for key in f.keys()}
        except Exception as e:  # safetensors has its own error types for a bad header or a short file
            raise UserError(f"{file} is not a readable safetensors file ({e}): download it again") from None
    return tensors


def _hf_tensor(hf_tensors: dict, name: str, tied: bool, hf: Path) -> torch.Tensor:
    key = hf_name(name)
    if key in hf_tensors:
        return hf_tensors[key]
    if name == "output" and tied and "model.embed_tokens.weight" in hf_tensors:  # the output shares the embedding
        return hf_tensors["model.embed_tokens.weight"].clone()  # clone: safetensors refuses shared storage
    raise UserError(f"{hf} has no tensor {key!r}: the checkpoint is incomplete (download every file) or does not "
                    f"match its config.json")


def _check_all_used(hf_tensors: dict, used: set[str], hf: Path) -> None:
    """Refuse tensors we would silently drop (biases, extra layers); old exports' inv_freq buffers are derived."""
    left = sorted(k for k in hf_tensors if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise UserError(f"{hf} holds tensors a Llama of this config has no place for: {', '.join(left[:4])}"
                        f"{' ...' if len(left) > 4 else ''}; check num_hidden_layers and that it is a plain Llama")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found: {what} must be in the folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


# ---------------------------------------------------------------- minititan -> Hugging Face


def minititan_to_hf(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write out_dir/config.json and out_dir/model.safetensors for transformers' LlamaForCausalLM from a
    minititan checkpoint (a step-N folder, or a folder of them: the newest is used), saved under any
    layout. Tensors keep the checkpoint's dtype. Returns out_dir."""
    path = Path(ckpt_dir)
    if not (path / "manifest.json").is_file():
        path = ckpt.latest(path) or path  # a checkpoint folder: take its newest step
    c = ckpt.Checkpoint(path)
    try:
        cfg = msgspec.convert(msgspec.toml.decode(c.manifest.config), Config)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(f"the config saved in {path} cannot be read ({e})") from None
    if cfg.model.name != "llama3":
        raise UserError(f"{path} holds a {cfg.model.name!r} model: only dense llama3 models convert to Hugging Face")
    tensors = {}
    for name in param_shapes(cfg.model):
        t = c.read(name)  # the full tensor, whatever layout saved it
        heads = _rope_heads(name, cfg.model)
        tensors[hf_name(name)] = (meta_to_hf_rope(t, heads) if heads else t).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dtype = tensors["model.embed_tokens.weight"].dtype
    (out / "config.json").write_text(json.dumps(hf_config(cfg.model, dtype), indent=2) + "\n")
    return out


def hf_config(m: Model, dtype: torch.dtype) -> dict:
    """The config.json transformers needs to build LlamaForCausalLM for model section m."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.dim,
        "intermediate_size": hidden_dim(m),
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.dim // m.n_heads,
        "vocab_size": m.vocab_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": _rope_to_hf(m),
        "max_position_embeddings": m.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _rope_to_hf(m: Model) -> dict | None:
    """config.json's rope_scaling: None (plain RoPE) or the llama3 parameters."""
    if not m.rope_scaling:
        return None
    return {"rope_type": "llama3", **{key: getattr(m, field) for key, field in LLAMA3_ROPE_KEYS.items()}}
