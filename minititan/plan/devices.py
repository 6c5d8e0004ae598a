"""Device profiles: a GPU and its links in a few numbers (plan/devices.toml says what each means)."""
from __future__ import annotations

import importlib.resources
import math
from pathlib import Path

import msgspec

from minititan.core.config import UserError


class Device(msgspec.Struct, forbid_unknown_fields=True):
    description: str
    capability: list[int]
    memory_gib: float
    reserved_gib: float
    fragmentation: float
    peak_bf16_tflops: float
    gemm_tflops: float
    gemm_fp8_tflops: float
    attention_tflops: float
    hbm_gbs: float
    elementwise_efficiency: float
    kernel_us: float
    host_op_us: float
    compiled_host_fraction: float
    nvlink_gbs: float
    network_gbs: float
    nvlink_latency_us: float
    network_latency_us: float
    comm_compute_slowdown: float
    optimizer_efficiency: dict[str, float]
    grouped_gemm_tflops: float | None = None  # None (a profile written before it): gemm_tflops
    grouped_gemm_rolloff_dim: float = 0.0  # smaller experts' grouped GEMMs run slower (timing.py); 0: no roll-off
    name: str = ""


def shipped() -> dict[str, Device]:
    text = importlib.resources.files("minititan").joinpath("plan/devices.toml").read_text()
    return read_profiles(text, "minititan/plan/devices.toml")


# what the time model divides by: a profile's zero here is a division by zero, not a fast GPU
RATES = {"memory_gib", "fragmentation", "peak_bf16_tflops", "gemm_tflops", "gemm_fp8_tflops", "grouped_gemm_tflops",
         "attention_tflops", "hbm_gbs", "elementwise_efficiency", "nvlink_gbs", "network_gbs"}
GROUPED_REFERENCE_DIM = 2048  # the smallest per-group dimension of the shapes grouped_gemm_tflops is measured at (calibrate.py)
OPTIMIZERS = ("fused", "foreach", "compiled")  # optimizer_efficiency's keys: the AdamW implementations


def read_profiles(text: str, where: str) -> dict[str, Device]:
    try:
        raw = msgspec.toml.decode(text)
        profiles = {name: msgspec.convert(body, Device) for name, body in raw.items()}
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise UserError(f"{where}: not a device profile ({e}); see minititan/plan/devices.toml for the keys") from None
    for name, d in profiles.items():
        numbers = {k: v for k, v in msgspec.structs.asdict(d).items() if isinstance(v, (int, float))}
        numbers |= {f"optimizer_efficiency.{k}": d.optimizer_efficiency.get(k) for k in OPTIMIZERS}
        for key, v in numbers.items():
            if v is None or not math.isfinite(v) or v < 0 or (v == 0 and (key in RATES or "." in key)):
                raise UserError(f"{where}: [{name}] {key} is {'missing' if v is None else v}: set it as "
                                f"minititan/plan/devices.toml does (a finite number, above zero for a rate)")
    return profiles


def load(name_or_path: str) -> Device:
    """A shipped profile by name (h100, h200, b200), or the first profile in a TOML file."""
    profiles = shipped()
    if name_or_path.lower() in profiles:
        device = profiles[name_or_path.lower()]
        return msgspec.structs.replace(device, name=name_or_path.lower())
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        try:
            in_file = read_profiles(path.read_text(), str(path))
        except UnicodeDecodeError:
            in_file = {}
        if not in_file:
            raise UserError(f"--gpu {path}: no profile in it: pass the .toml that `minititan plan --calibrate` wrote, "
                            f"or one of {', '.join(profiles)}")
        name, device = next(iter(in_file.items()))
        return msgspec.structs.replace(device, name=name)
    raise UserError(f"--gpu {name_or_path!r} is neither a known GPU ({', '.join(profiles)}) nor a profile file: "
                    f"pass one of those, or the .toml that `minititan plan --calibrate` wrote")
