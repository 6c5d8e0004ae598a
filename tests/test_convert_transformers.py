"""Hugging Face conversion against transformers itself: tiny random Llama, Mixtral, Qwen2-MoE and Qwen3-MoE
models built with `transformers`, saved with save_pretrained, converted to minititan and back.

minititan's fp32 logits must match transformers' (relative difference of the whole logits tensor < 1e-5),
and the exported folder must load with from_pretrained (no missing or unexpected tensors) and give the same
logits again. Skipped when transformers is not installed (it is not a dependency; docs/moe.md names the
version this passed with).
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minititan.convert import config_from_hf, hf_to_minititan, minititan_to_hf  # noqa: E402
from minititan.core import model  # noqa: E402
from minititan.generate import load_for_inference  # noqa: E402

COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "max_position_embeddings": 256, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32"}
CASES = {
    "llama": ("LlamaForCausalLM", {"model_type": "llama", "attention_bias": False, "mlp_bias": False}),
    "mixtral": ("MixtralForCausalLM", {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
                                       "sliding_window": None}),
    # a shared expert of 2 routed widths with its sigmoid gate, q/k/v biases, the first block dense, top-k not
    # renormalized
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 3,
                                          "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                                          "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [0],
                                          "qkv_bias": True, "use_sliding_window": False}),
    # head_dim 32 with 4 heads at hidden 64 (wider than hidden / heads, as Qwen3-30B-A3B), per-head q/k norms,
    # renormalized top-k, tied embeddings
    "qwen3_moe": ("Qwen3MoeForCausalLM", {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 32, "norm_topk_prob": True, "head_dim": 32,
                                          "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
                                          "use_sliding_window": False, "tie_word_embeddings": True}),
}


def tiny_model(folder, family: str):
    """A random tiny model of the family, configured through a config.json as Hub checkpoints are."""
    architecture, extra = CASES[family]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(COMMON | extra | {"architectures": [architecture]}))
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(folder)
    hf = getattr(transformers, architecture)(config).float().eval()
    with torch.no_grad():  # well-scaled random weights; norms away from 1 and biases away from 0 so their mapping shows
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_((1 if name.endswith("norm.weight") else 0) + 0.2 * torch.randn_like(p))
            elif name.endswith("gate.weight") and p.shape[0] > 1:  # routers: wide score gaps, no near-ties in top-k
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return hf


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", list(CASES))
def test_logits_match_transformers_both_ways(tmp_path, family):
    hf = tiny_model(tmp_path / "config", family)
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits.float()
        cfg, params = load_for_inference(hf_to_minititan(tmp_path / "hf", tmp_path / "mt"))
        ours = model.forward(params, tokens, cfg.model)
        back_dir = minititan_to_hf(tmp_path / "mt", tmp_path / "hf-back")
        architecture = getattr(transformers, CASES[family][0])
        back, info = architecture.from_pretrained(back_dir, output_loading_info=True)
        again = back.float().eval()(input_ids=tokens).logits.float()
    assert rel_diff(ours, want) < 1e-5, f"hf -> minititan: rel diff {rel_diff(ours, want):.2e}"
    assert not {k: v for k, v in info.items() if v}, info
    assert rel_diff(again, want) < 1e-5, f"minititan -> hf: rel diff {rel_diff(again, want):.2e}"
    written = json.loads((back_dir / "config.json").read_text())
    assert written["model_type"] == family
    assert config_from_hf(written).model == cfg.model  # the exported config.json describes the same model


def test_the_checks_have_teeth(tmp_path):
    """A converted Qwen3-MoE without its q/k norms, or with Mixtral's renormalized routing switched off,
    gives other logits: the comparisons above would catch a mapping that drops either."""
    from msgspec.structs import replace
    hf = tiny_model(tmp_path / "config", "qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits.float()
        cfg, params = load_for_inference(hf_to_minititan(tmp_path / "hf", tmp_path / "mt"))
        no_norm = {n: (torch.ones_like(t) if n.endswith(("q_norm", "k_norm")) else t) for n, t in params.items()}
        assert rel_diff(model.forward(no_norm, tokens, cfg.model), want) > 1e-3
        plain = replace(cfg.model, route_norm=False)
        assert rel_diff(model.forward(params, tokens, plain), want) > 1e-3
