"""Check minititan's Hugging Face converter against transformers itself (needs `pip install transformers`):

    python benchmarks/hf_logits_check.py

For each case (no RoPE scaling, Llama 3.1's factor 8, Llama 3.2's factor 32; tied/untied embeddings; one file/shards) it builds a tiny
random LlamaForCausalLM, saves it with save_pretrained, converts it with hf_to_minititan and compares
minititan's fp32 logits with transformers'. Then it converts back with minititan_to_hf, reloads that with
from_pretrained (no missing or unexpected keys allowed) and checks it gives transformers' logits again.
Runs on the CPU in fp32: the check is about weight layouts, which no device changes. Exits 1 on a mismatch.

Tolerance: transformers computes RoPE angles in fp32, minititan in fp64, so logits differ by ~1e-6.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minititan.convert import hf_to_minititan, minititan_to_hf
from minititan.core import model
from minititan.generate import load_for_inference

TOLERANCE = 1e-4
def llama3_scaling(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def tiny_llama(folder: Path, scaling: float | None, tied: bool) -> LlamaForCausalLM:
    """A random tiny Llama 3, configured through a legacy-style config.json as Hub checkpoints are."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
              "rope_scaling": llama3_scaling(scaling) if scaling else None, "tie_word_embeddings": tied,
              "max_position_embeddings": 131072 if scaling else 2048, "torch_dtype": "float32"}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig.from_pretrained(folder)).float().eval()
    with torch.no_grad():  # well-scaled random weights, norms away from 1 so their mapping shows
        for p in hf.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * p.shape[1] ** -0.5)
    return hf


def check(tmp: Path, scaling: float | None, tied: bool, sharded: bool) -> bool:
    name = f"scaling={scaling} tied={tied} sharded={sharded}"
    hf = tiny_llama(tmp / "config", scaling, tied)
    hf.save_pretrained(tmp / "hf", **({"max_shard_size": "200KB"} if sharded else {}))
    shards = sorted(p.name for p in (tmp / "hf").glob("*.safetensors"))
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits.float()
        cfg, params = load_for_inference(hf_to_minititan(tmp / "hf", tmp / "mt"))
        ours = model.forward(params, tokens, cfg.model)
        back, info = LlamaForCausalLM.from_pretrained(minititan_to_hf(tmp / "mt", tmp / "hf-back"),
                                                      output_loading_info=True)
        again = back.float().eval()(input_ids=tokens).logits.float()
    to_mt, to_hf = (ours - want).abs().max().item(), (again - want).abs().max().item()
    bad_keys = {k: v for k, v in info.items() if v}
    ok = to_mt < TOLERANCE and to_hf < TOLERANCE and not bad_keys
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {len(shards)} file(s); max |logit diff| hf->minititan {to_mt:.2e}, "
          f"minititan->hf {to_hf:.2e} (|logits| up to {want.abs().max().item():.1f})"
          + (f"; loading info {bad_keys}" if bad_keys else ""))
    return ok


def main() -> int:
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    results = []
    cases = [(None, False, False), (8.0, False, True), (None, True, False), (32.0, True, True)]
    for scaling, tied, sharded in cases:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(check(Path(tmp), scaling, tied, sharded))
    print("all match" if all(results) else "MISMATCH")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
