"""Hugging Face interop: convert Llama 3, Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints between Hugging
Face's format and minititan's.

    hf_to_minititan("Llama-3.1-8B/", "converted/")   # -> converted/step-00000000 (+ config.toml)
    minititan_to_hf("outputs/checkpoints/step-00001000", "hf-out/")  # -> hf-out/config.json, model.safetensors

Besides the parameter names, three things differ between the formats:

  * The RoPE layout. Meta's code (and minititan's `apply_rope`) rotates consecutive pairs
    (x0, x1), (x2, x3), ... of each head. Hugging Face rotates the first half of a head against its
    second half (`rotate_half`): pairs (x_i, x_{i + head_dim/2}). The two compute the same attention
    if the rows of wq and wk are reordered inside each head, Meta row 2i + j <-> HF row j * head_dim/2 + i:
    q.k is a sum over the head dim, so permuting q and k the same way leaves it unchanged, and wv, wo
    need no change at all. What acts on q or k element-wise before RoPE moves with them: the q/k
    biases (Qwen2) and the per-head q/k norm weights (Qwen3).
  * The feed-forward width. Hugging Face stores `intermediate_size`; minititan derives the width from
    `ffn_dim_multiplier` and `multiple_of` (config.hidden_dim), so we pick a pair that lands on it.
  * The experts. Hugging Face checkpoints hold one tensor per expert (`...experts.3.w1.weight`);
    minititan stacks a layer's experts into one [E, hidden, dim] tensor. Routing is the same math:
    Mixtral's softmax over all experts, top-k, renormalized is model.route_norm = true (equal to a
    softmax over the top-k logits); Qwen's norm_topk_prob is route_norm. Their routers have no
    expert bias, so a converted model's starts at zero, and one trained with the bias update
    (model.bias_update_rate > 0) does not export.

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
from minititan.core.config import (Config, ConfigError, Job, Model, Training, UserError, config_to_toml, head_dim,
                                   hidden_dim, validate)
from minititan.core.model import param_shapes
from minititan.core.moe import expert_hidden_dim

# Hugging Face's "llama3" RoPE scaling keys -> the model fields that carry them (used when model.rope_scaling)
LLAMA3_ROPE_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                    "high_freq_factor": "rope_high_freq_factor",
                    "original_max_position_embeddings": "rope_original_context"}

FAMILIES = {"llama": "Llama", "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}  # model_type

_LAYER_NAMES = {  # minititan name inside layers.{i} -> Hugging Face name inside model.layers.{i}, every family
    "attention_norm": "input_layernorm.weight",
    "attention.wq": "self_attn.q_proj.weight",
    "attention.wk": "self_attn.k_proj.weight",
    "attention.wv": "self_attn.v_proj.weight",
    "attention.wo": "self_attn.o_proj.weight",
    "attention.bq": "self_attn.q_proj.bias",  # qkv_bias (Qwen2)
    "attention.bk": "self_attn.k_proj.bias",
    "attention.bv": "self_attn.v_proj.bias",
    "attention.q_norm": "self_attn.q_norm.weight",  # qk_norm (Qwen3)
    "attention.k_norm": "self_attn.k_norm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "feed_forward.w1": "mlp.gate_proj.weight",
    "feed_forward.w2": "mlp.down_proj.weight",
    "feed_forward.w3": "mlp.up_proj.weight",
}
_MOE_NAMES = {  # family -> minititan name inside layers.{i}.moe -> Hugging Face name; {e}: one tensor per expert
    "mixtral": {"router": "block_sparse_moe.gate.weight", "experts.w1": "block_sparse_moe.experts.{e}.w1.weight",
                "experts.w2": "block_sparse_moe.experts.{e}.w2.weight",
                "experts.w3": "block_sparse_moe.experts.{e}.w3.weight"},
    "qwen": {"router": "mlp.gate.weight", "experts.w1": "mlp.experts.{e}.gate_proj.weight",
             "experts.w2": "mlp.experts.{e}.down_proj.weight", "experts.w3": "mlp.experts.{e}.up_proj.weight",
             "shared.w1": "mlp.shared_expert.gate_proj.weight", "shared.w2": "mlp.shared_expert.down_proj.weight",
             "shared.w3": "mlp.shared_expert.up_proj.weight", "shared_gate": "mlp.shared_expert_gate.weight"},
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}


def hf_names(name: str, family: str, n_experts: int) -> list[str]:
    """minititan name -> its Hugging Face tensor names: layers.3.attention.wq -> [model.layers.3.self_attn.q_proj.weight];
    a stacked expert tensor -> one name per expert (stacked along dim 0); expert_bias -> [] (Hugging Face's
    Mixtral and Qwen MoE route without one)."""
    if not name.startswith("layers."):
        return [_TOP_NAMES[name]]
    _, i, rest = name.split(".", 2)
    if not rest.startswith("moe."):
        return [f"model.layers.{i}.{_LAYER_NAMES[rest]}"]
    rest = rest.removeprefix("moe.")
    if rest == "expert_bias":
        return []
    hf = _MOE_NAMES["mixtral" if family == "mixtral" else "qwen"][rest]
    return [f"model.layers.{i}.{hf.format(e=e)}" for e in range(n_experts)] if "{e}" in hf else [f"model.layers.{i}.{hf}"]


# ---------------------------------------------------------------- the RoPE permutation


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of wq/wk inside each head: row 2i + j (pair i, member j) goes to j * head_dim/2 + i.
    This is the permutation of Hugging Face's convert_llama_weights_to_hf."""
    return w.unflatten(0, (n_heads, -1, 2)).transpose(1, 2).flatten(0, 2)


def hf_to_meta_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse: view each head as [2 halves, head_dim/2] and interleave the halves back into pairs."""
    return w.unflatten(0, (n_heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def _rope_heads(name: str, m: Model) -> int | None:
    """How many heads a tensor's rows hold, if RoPE rotates its outputs (wq, wk, their biases, and the
    per-head q/k norm weights, one head's worth); else None."""
    leaf = name.rsplit(".", 1)[-1]
    return {"wq": m.n_heads, "bq": m.n_heads, "wk": m.n_kv_heads, "bk": m.n_kv_heads, "q_norm": 1, "k_norm": 1}.get(
        leaf) if ".attention." in name else None


# ---------------------------------------------------------------- Hugging Face -> minititan


def hf_to_minititan(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a Hugging Face Llama, Mixtral, Qwen2-MoE or Qwen3-MoE folder (config.json + model.safetensors,
    or shards with model.safetensors.index.json) into a minititan checkpoint at out_dir/step-00000000.

    Also writes out_dir/config.toml (the config, for `minititan train -c`) and copies tokenizer.json
    when the folder has one, pointing data.tokenizer at the copy. Returns the checkpoint path."""
    hf, out = Path(hf_dir), Path(out_dir)
    if not hf.is_dir():
        raise UserError(f"{hf} is not a folder: pass a Hugging Face model folder (config.json + *.safetensors)")
    hf_cfg = _read_json(hf / "config.json", "the model's config.json")
    cfg = config_from_hf(hf_cfg, hf.name)
    family, m = hf_cfg["model_type"], cfg.model
    hf_tensors = read_hf_tensors(hf)
    params, used = {}, set()
    for name, shape in param_shapes(m).items():
        keys = hf_names(name, family, m.n_experts)
        if not keys:  # the expert bias: Hugging Face's routers have none, so it starts at zero
            params[name] = torch.zeros(shape, dtype=hf_tensors["model.embed_tokens.weight"].dtype)
            continue
        parts = [_hf_tensor(hf_tensors, key, name, bool(hf_cfg.get("tie_word_embeddings")), hf) for key in keys]
        t = torch.stack(parts) if len(keys) > 1 or ".moe.experts." in name else parts[0]
        if tuple(t.shape) != shape:
            raise UserError(f"{keys[0]} has shape {list(parts[0].shape)} but config.json implies "
                            f"{list(shape[1:] if len(keys) > 1 else shape)}: config.json and the weights in {hf} "
                            f"do not match")
        heads = _rope_heads(name, m)
        params[name] = hf_to_meta_rope(t, heads) if heads else t
        used |= set(keys)
    _check_all_used(hf_tensors, used, hf)
    out.mkdir(parents=True, exist_ok=True)
    if (hf / "tokenizer.json").is_file():
        shutil.copyfile(hf / "tokenizer.json", out / "tokenizer.json")
        cfg.data.tokenizer = str((out / "tokenizer.json").resolve())
    text = config_to_toml(cfg)
    (out / "config.toml").write_text(text)
    return ckpt.save(out, 0, {n: (t, ckpt.full_slice(t.shape)) for n, t in params.items()}, config=text)


def config_from_hf(hf: dict, source: str = "a Hugging Face model") -> Config:
    """A minititan Config whose model section is the model a Hugging Face config.json describes:
    model_type llama (-> model.name llama3), mixtral, qwen2_moe or qwen3_moe (-> model.name moe)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"config.json has model_type {family!r}: only {', '.join(FAMILIES.values())} checkpoints "
                        f"(model_type {', '.join(repr(f) for f in FAMILIES)}) convert")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    required += {"mixtral": ["num_local_experts", "num_experts_per_tok"],
                 "qwen2_moe": ["moe_intermediate_size", "num_experts_per_tok", "shared_expert_intermediate_size"],
                 "qwen3_moe": ["moe_intermediate_size", "num_experts_per_tok"]}.get(family, [])
    for key in required:
        if key not in hf:
            raise UserError(f"config.json has no {key!r}: it is not a complete {FAMILIES[family]} config")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise UserError("config.json asks for a non-silu activation or feed-forward biases: minititan's feed-forwards "
                        "are SwiGLU without biases, so this model does not convert")
    if hf.get("attention_bias") and family != "qwen2_moe":
        raise UserError("config.json has attention_bias = true (biases on q, k, v and o): minititan has q/k/v biases "
                        "only (model.qkv_bias), so this model does not convert")
    if _sliding_window(hf, family):
        raise UserError(f"config.json enables sliding-window attention (sliding_window {hf.get('sliding_window')}): "
                        f"minititan attends over the whole context, so this model does not convert")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head = hf.get("head_dim") or dim // n_heads
    ffn_dim_multiplier, multiple_of = ffn_settings(dim, hf["intermediate_size"])
    max_seq_len = hf.get("max_position_embeddings", 2048)
    fields = dict(dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=0 if head * n_heads == dim else head,
                  vocab_size=hf["vocab_size"], ffn_dim_multiplier=ffn_dim_multiplier, multiple_of=multiple_of,
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=max_seq_len, **_rope_from_hf(hf))
    model = Model(name="llama3" if family == "llama" else "moe", **fields, **_moe_from_hf(hf, family))
    cfg = Config(job=Job(description=f"converted from Hugging Face {source}"), model=model,
                 training=Training(seq_len=min(Training().seq_len, max_seq_len)))
    validate(cfg)
    return cfg


def _sliding_window(hf: dict, family: str) -> bool:
    """Whether attention is windowed: Mixtral when sliding_window is set below the context, Qwen when
    use_sliding_window is on (their sliding_window alone is a default that is not used)."""
    if family.startswith("qwen"):
        return bool(hf.get("use_sliding_window"))
    window = hf.get("sliding_window")
    return window is not None and window < hf.get("max_position_embeddings", 2048)


def _moe_from_hf(hf: dict, family: str) -> dict:
    """The model's MoE fields for a Mixtral / Qwen MoE config.json (nothing for Llama)."""
    if family == "llama":
        return {}
    n_experts = hf.get("num_local_experts") if family == "mixtral" else hf.get("num_experts", hf.get("num_local_experts"))
    fields = dict(n_experts=n_experts, top_k=hf["num_experts_per_tok"], score_func="softmax",
                  aux_loss_coef=0.0, bias_update_rate=0.0)
    if family == "mixtral":  # every block's feed-forward is routed, the chosen scores renormalized
        return fields | dict(moe_hidden_dim=hf["intermediate_size"], route_norm=True)
    expert = hf["moe_intermediate_size"]
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise UserError(f"config.json has mlp_only_layers {dense}: minititan keeps dense feed-forwards only in the "
                        f"first model.n_dense_layers blocks, so this model does not convert")
    fields |= dict(moe_hidden_dim=expert, route_norm=bool(hf.get("norm_topk_prob", False)),
                   moe_frequency=hf.get("decoder_sparse_step", 1), n_dense_layers=len(dense))
    if family == "qwen3_moe":
        return fields | dict(qk_norm=True)
    shared = hf["shared_expert_intermediate_size"]
    if shared % expert:
        raise UserError(f"config.json has shared_expert_intermediate_size {shared}, not a multiple of "
                        f"moe_intermediate_size {expert}: minititan's shared experts are n_shared_experts experts "
                        f"of the routed width, so this model does not convert")
    return fields | dict(qkv_bias=bool(hf.get("qkv_bias", True)), n_shared_experts=shared // expert,
                         shared_expert_gate=True)


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


def _hf_tensor(hf_tensors: dict, key: str, name: str, tied: bool, hf: Path) -> torch.Tensor:
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
        raise UserError(f"{hf} holds tensors a model of its config.json has no place for: {', '.join(left[:4])}"
                        f"{' ...' if len(left) > 4 else ''}; check num_hidden_layers and the model_type")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found: {what} must be in the folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): download {what} again") from None


# ---------------------------------------------------------------- minititan -> Hugging Face


def minititan_to_hf(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write out_dir/config.json and out_dir/model.safetensors for transformers from a minititan checkpoint
    (a step-N folder, or a folder of them: the newest is used), saved under any layout: a llama3 model as
    LlamaForCausalLM, a moe model as the Mixtral, Qwen2-MoE or Qwen3-MoE it matches (hf_family). Tensors
    keep the checkpoint's dtype. Returns out_dir."""
    path = Path(ckpt_dir)
    if not (path / "manifest.json").is_file():
        path = ckpt.latest(path) or path  # a checkpoint folder: take its newest step
    c = ckpt.Checkpoint(path, advice="pass another step-N folder as CKPT_DIR")
    try:
        cfg = msgspec.convert(msgspec.toml.decode(c.manifest.config), Config)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(f"the config saved in {path} cannot be read ({e}): pass another step-N folder") from None
    m = cfg.model
    family = hf_family(m, str(path))
    tensors = {}
    for name in param_shapes(m):
        t = c.read(name)  # the full tensor, whatever layout saved it
        keys = hf_names(name, family, m.n_experts)
        if not keys:
            if t.any():
                raise UserError(f"{path}: {name} is not zero, and {FAMILIES[family]} routes without an expert bias, "
                                f"so its routing would change; train with model.bias_update_rate = 0 (and the aux "
                                f"loss, model.aux_loss_coef) to export")
            continue
        heads = _rope_heads(name, m)
        t = meta_to_hf_rope(t, heads) if heads else t
        for key, part in zip(keys, t.unbind(0) if ".moe.experts." in name else [t]):
            tensors[key] = part.contiguous()
    if family == "qwen2_moe" and not m.qkv_bias:  # its q/k/v always have biases: zeros add nothing
        dtype, hd = tensors["model.embed_tokens.weight"].dtype, head_dim(m)
        for i in range(m.n_layers):
            for leaf, heads in (("bq", m.n_heads), ("bk", m.n_kv_heads), ("bv", m.n_kv_heads)):
                tensors[hf_names(f"layers.{i}.attention.{leaf}", family, 0)[0]] = torch.zeros(heads * hd, dtype=dtype)
    c.verify()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dtype = tensors["model.embed_tokens.weight"].dtype
    (out / "config.json").write_text(json.dumps(hf_config(m, dtype, family), indent=2) + "\n")
    return out


def hf_family(m: Model, source: str = "this model") -> str:
    """The Hugging Face model_type that computes what model section m computes; a UserError naming, for
    each family, what m lacks for it when none does."""
    if m.name == "llama3":
        if m.qkv_bias or m.qk_norm:
            raise UserError(f"{source} has model.qkv_bias or model.qk_norm: Hugging Face's Llama has neither, so "
                            f"only a MoE model with them converts (as Qwen2-MoE / Qwen3-MoE)")
        return "llama"
    needs = {  # family -> (holds?, what it needs) in order
        "mixtral": [(not m.n_shared_experts, "no shared experts"), (not m.qk_norm and not m.qkv_bias,
                    "no q/k norms or q/k/v biases"), (m.route_norm, "model.route_norm = true"),
                    (m.moe_frequency == 1 and not m.n_dense_layers, "every block MoE")],
        "qwen3_moe": [(m.qk_norm, "model.qk_norm = true"), (not m.qkv_bias, "no q/k/v biases"),
                      (not m.n_shared_experts, "no shared experts")],
        "qwen2_moe": [(m.n_shared_experts > 0 and m.shared_expert_gate, "gated shared experts "
                       "(model.n_shared_experts >= 1, model.shared_expert_gate = true)"), (not m.qk_norm, "no q/k norms")],
    }
    common = [(m.score_func == "softmax", "model.score_func = \"softmax\""), (m.route_scale == 1.0, "model.route_scale = 1")]
    missing = {}
    for family, checks in needs.items():
        unmet = [what for ok, what in common + checks if not ok]
        if not unmet:
            return family
        missing[family] = unmet[0]
    raise UserError(f"{source} holds a MoE model that no Hugging Face family computes exactly: "
                    + "; ".join(f"{FAMILIES[f]} needs {what}" for f, what in missing.items()))


def hf_config(m: Model, dtype: torch.dtype, family: str = "llama") -> dict:
    """The config.json transformers needs to build the `family` model (hf_family) for model section m."""
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                           "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family]],
        "model_type": family,
        "hidden_size": m.dim,
        "intermediate_size": hidden_dim(m),
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": head_dim(m),
        "vocab_size": m.vocab_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": _rope_to_hf(m),
        "max_position_embeddings": m.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family == "llama":
        return config | {"mlp_bias": False}
    config |= {"num_experts_per_tok": m.top_k, "output_router_logits": False}
    if family == "mixtral":
        return config | {"intermediate_size": expert_hidden_dim(m), "num_local_experts": m.n_experts,
                         "sliding_window": None}
    config |= {"num_experts": m.n_experts, "moe_intermediate_size": expert_hidden_dim(m),
               "norm_topk_prob": m.route_norm, "decoder_sparse_step": m.moe_frequency,
               "mlp_only_layers": list(range(m.n_dense_layers)), "use_sliding_window": False}
    if family == "qwen2_moe":
        return config | {"qkv_bias": True, "shared_expert_intermediate_size": m.n_shared_experts * expert_hidden_dim(m)}
    return config


def _rope_to_hf(m: Model) -> dict | None:
    """config.json's rope_scaling: None (plain RoPE) or the llama3 parameters."""
    if not m.rope_scaling:
        return None
    return {"rope_type": "llama3", **{key: getattr(m, field) for key, field in LLAMA3_ROPE_KEYS.items()}}
