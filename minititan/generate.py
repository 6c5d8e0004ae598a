"""Sample text from a checkpoint: `minititan generate --checkpoint DIR --prompt "ROMEO:"`.

Loads the full parameters (from any layout's checkpoint) and the config saved beside them, then
samples token by token with temperature and top-k. No KV cache: the debug model is small enough
that re-running the whole prefix keeps the code obvious.
"""
from __future__ import annotations

from pathlib import Path

import msgspec
import torch

from minititan.core import checkpoint as ckpt
from minititan.core import model
from minititan.core.config import Config, ConfigError
from minititan.data.tokenizer import load_tokenizer


def load_for_inference(path: str, device: str = "cpu", advice: str = ckpt.USE_ANOTHER) -> tuple[Config, dict]:
    """The config and full parameters of a step-N checkpoint (or of the newest one in a folder of
    them). `advice` ends each error: how the caller's user names another checkpoint."""
    newest = ckpt.latest(path) if not (Path(path) / "manifest.json").exists() else None
    c = ckpt.Checkpoint(newest or path, advice=advice)
    try:
        cfg = msgspec.convert(msgspec.toml.decode(c.manifest.config), Config)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(f"the config saved in {c.path} cannot be read ({e}): {advice}") from None
    shapes = model.param_shapes(cfg.model)
    params = {n: c.read(n, ckpt.full_slice(s), torch.float32).to(device) for n, s in shapes.items()}
    c.verify()
    return cfg, params


@torch.no_grad()
def sample(params: dict, cfg: Config, prompt_ids: list[int], max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    device = next(iter(params.values())).device
    ids = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        context = ids[:, -cfg.model.max_seq_len:]
        logits = model.forward(params, context, cfg.model)[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return ids[0].tolist()


def generate_text(params: dict, cfg: Config, prompt: str, **kw) -> str:
    tok = load_tokenizer(cfg.data.tokenizer)
    return tok.decode(sample(params, cfg, tok.encode(prompt), **kw))
