"""The training configuration: one msgspec Struct per TOML section, plus overrides and validation.

A run is described by a TOML file (`configs/*.toml`) and `--section.key=value` overrides on the
command line, torchtitan style. Every field has a default and a comment; the names are a contract
that tests, configs and later features rely on. Errors are `ConfigError`s: one line naming the key
and the fix, which the CLI prints without a traceback.
"""
from __future__ import annotations

import difflib
import importlib.resources
import math
from pathlib import Path
from typing import Any, Literal

import msgspec


class UserError(Exception):
    """Bad input (config, files, layout): the message names the fix; the CLI prints it, no traceback."""


class AgreedError(UserError):
    """A UserError every rank raises alike (from the config, files all ranks read, or values the ranks
    agreed on): the CLI prints rank 0's and the others exit quietly, so a job shows it once."""


class ConfigError(AgreedError, ValueError):
    """A bad config: the message names the key and what would be valid."""


class Job(msgspec.Struct, forbid_unknown_fields=True):
    dump_folder: str = "./outputs"  # metrics.jsonl, checkpoints and traces go under here
    description: str = "minititan run"


class Model(msgspec.Struct, forbid_unknown_fields=True):
    name: Literal["llama3", "moe"] = "llama3"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads / n_kv_heads queries share one k/v head
    head_dim: int = 0  # 0 = dim / n_heads (Qwen3: 128 at dim 2048 with 32 heads)
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    vocab_size: int = 256  # 256 = the byte tokenizer
    ffn_dim_multiplier: float = 1.0  # hidden = multiple_of-rounded (ffn_dim_multiplier * 8/3 * dim)
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: bool = False  # Llama 3 long-context frequency scaling, shaped by the four rope_* keys below
    rope_scaling_factor: float = 8.0  # low frequencies slow down this much (Llama 3.1: 8, Llama 3.2: 32)
    rope_low_freq_factor: float = 1.0  # wavelengths over rope_original_context / this are fully scaled
    rope_high_freq_factor: float = 4.0  # wavelengths under rope_original_context / this are kept; between: blended
    rope_original_context: int = 8192  # the context length pre-training used before the extension
    max_seq_len: int = 256
    # mixture of experts (model.name = "moe"); ignored by llama3
    moe_frequency: int = 1  # every N-th block has a MoE feed-forward
    n_dense_layers: int = 0  # the first N blocks keep a dense feed-forward (DeepSeek's first_k_dense_replace)
    n_experts: int = 8
    top_k: int = 2
    moe_hidden_dim: int = 0  # 0 = the dense hidden dim
    n_shared_experts: int = 0  # run as one SwiGLU of n_shared_experts * the expert hidden dim
    shared_expert_gate: bool = False  # scale the shared experts' output by sigmoid(h @ gate) (Qwen2-MoE)
    score_func: Literal["softmax", "sigmoid"] = "softmax"  # softmax over all experts, or a sigmoid per expert
    route_norm: bool = False  # renormalize the top-k scores to sum to 1 (norm_topk_prob; Mixtral: true)
    route_scale: float = 1.0  # multiply the routed experts' weights (DeepSeek-V3's routed_scaling_factor)
    aux_loss_coef: float = 0.0  # load-balancing auxiliary loss weight
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing (DeepSeek-V3); 0 = off


class Training(msgspec.Struct, forbid_unknown_fields=True):
    steps: int = 300
    seq_len: int = 128
    global_batch_size: int = 0  # sequences per optimizer step, over all data-parallel ranks; 0 = local x data-parallel ranks
    local_batch_size: int = 16  # micro-batch per data-parallel rank; accumulation = global / (local * dp)
    seed: int = 0
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; masters stay fp32
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"  # gradient reduction dtype
    max_norm: float = 1.0  # global gradient-norm clipping; 0 = off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False  # repeatable GPU runs: deterministic kernels only, at some speed (docs/debugging.md)
    skip_nonfinite_steps: int = 0  # skip up to N steps whose loss or grad norm is inf/NaN (logged); the N+1-th stops the run


class Optimizer(msgspec.Struct, forbid_unknown_fields=True):
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-3
    betas: list[float] = msgspec.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # fused: torch's one-kernel update (CUDA and CPU); compiled: the same math through inductor,
    # without the fused kernel's write-back of the clipped gradient; foreach: torch._foreach_* ops;
    # auto: compiled when compile.enable on a GPU (faster there, benchmarks/single_gpu.md), else fused
    implementation: Literal["auto", "fused", "foreach", "compiled"] = "auto"


class LrScheduler(msgspec.Struct, forbid_unknown_fields=True):
    warmup_steps: int = 20
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # the lr decays to lr * min_lr_ratio


class Parallelism(msgspec.Struct, forbid_unknown_fields=True):
    dp_replicate: int = 1  # plain data parallel (or the replica dim of HSDP)
    dp_shard: int = 1  # fully sharded data parallel degree; -1 = whatever is left of the world
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel (folds into dp_shard x cp)
    # ep: 0 = exact all-to-all (its split sizes read on the host once per MoE layer); c > 0 = fixed buffers of
    # c x the mean rows per peer, no host sync, rows over them dropped (moe/dropped_fraction); c = ep never drops
    ep_capacity_factor: float = 0.0
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    pp_microbatches: int = 0  # per pipeline (one per local batch): must divide local_batch_size; 0 = local_batch_size
    pp_virtual_stages: int = 2  # stages per pp rank under interleaved_1f1b (the other schedules run one)
    pp_layers_per_stage: list[int] = msgspec.field(default_factory=list)  # [] = balanced by flops; else one per stage
    sequence_parallel: bool = False  # tp: shard norms/residuals along the sequence between blocks
    async_tp: bool = False  # tp: overlap SP's all-gather / reduce-scatter with the matmuls (needs sequence_parallel)
    cp_rotate: Literal["ring", "allgather"] = "ring"  # cp: pass K/V around a ring, or all-gather them at once
    fsdp_reshard_after_forward: bool = True  # dp_shard: free each unit's gathered params after its forward
    fsdp_reduce_every_microbatch: bool = True  # dp_shard: false = keep full grads until the last micro-batch


class Source(msgspec.Struct, forbid_unknown_fields=True):
    path: str  # a shard folder (`minititan tokenize`), a token file, or shakespeare
    weight: float = 1.0  # share of the rows of every batch, relative to the other sources' weights


class Data(msgspec.Struct, forbid_unknown_fields=True):
    dataset: str = "shakespeare"  # shakespeare | synthetic | a shard folder | a token file (.bin/.npy)
    tokenizer: str = "byte"  # byte | a Hugging Face tokenizer.json | a tiktoken BPE file: what made the tokens
    sources: list[Source] = msgspec.field(default_factory=list)  # [{path=..., weight=...}, ...]: replaces dataset
    holdout_fraction: float = 0.0  # of every source's chunks, kept for validation and never trained on
    document_masking: bool = False  # attention and positions restart at each document inside a sequence
    prefetch: int = 2  # batches prepared ahead on a background thread (0: read in the step)


class Checkpoint(msgspec.Struct, forbid_unknown_fields=True):
    enable: bool = True
    folder: str = "checkpoints"  # relative to job.dump_folder unless absolute
    interval: int = 500  # save every N steps (and at the end)
    keep_latest_k: int = 2  # 0 = keep all
    load_path: str = ""  # start from this checkpoint (its params; step restarts unless resume)
    resume: bool = True  # resume from the newest complete checkpoint in folder
    async_save: bool = False  # copy to the host, write on a background thread while training goes on


class Metrics(msgspec.Struct, forbid_unknown_fields=True):
    log_freq: int = 10
    jsonl: bool = True  # append one JSON object per logged step to <dump_folder>/metrics.jsonl


class ActivationCheckpoint(msgspec.Struct, forbid_unknown_fields=True):
    mode: Literal["none", "full", "selective"] = "none"
    selective: str = "op"  # "op" (save matmul outputs but the query projection's), "attention" (save only the attention's output), or N (checkpoint every N-th block)


class Compile(msgspec.Struct, forbid_unknown_fields=True):
    enable: bool = False


class Validation(msgspec.Struct, forbid_unknown_fields=True):
    enable: bool = False
    freq: int = 100  # evaluate every N steps (and at the last step)
    steps: int = 3  # batches of training.global_batch_size sequences per evaluation (the same batches each time)
    dataset: str = ""  # "" = the training data's held-out part (shakespeare: its last 10%; else data.holdout_fraction); or a shard folder / token file


class Profiling(msgspec.Struct, forbid_unknown_fields=True):
    enable: bool = False  # a torch.profiler trace per rank (Chrome / Perfetto JSON) of the steps below
    start_step: int = 5
    steps: int = 2
    folder: str = "profiling"  # relative to job.dump_folder unless absolute
    memory_snapshot: bool = False  # CUDA: allocator history, dumped at the peak step and on out-of-memory


class Comm(msgspec.Struct, forbid_unknown_fields=True):
    trace: bool = False  # record every collective / P2P call; print a per-step table at the end
    timeout_s: float = 600.0  # a collective that waits longer than this fails (instead of hanging)


class Float8(msgspec.Struct, forbid_unknown_fields=True):
    enable: bool = False  # Float8 matmuls (torch._scaled_mm) for every linear whose dims are multiples of 16
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"  # one scale per tensor, or per row
    filter: list[str] = msgspec.field(default_factory=lambda: ["output"])  # names kept in bf16
    fsdp_all_gather: bool = False  # dp_shard: all-gather the fp8 weights as fp8 (half the bytes); tensorwise only
    precompute_scale: bool = False  # fsdp_all_gather: every weight's fp8 scale in one all-reduce after the step
    force_recompute_weight_in_bwd: bool = False  # save the high-precision weight, not its fp8 copy; re-cast in backward


class Config(msgspec.Struct, forbid_unknown_fields=True):
    job: Job = msgspec.field(default_factory=Job)
    model: Model = msgspec.field(default_factory=Model)
    training: Training = msgspec.field(default_factory=Training)
    optimizer: Optimizer = msgspec.field(default_factory=Optimizer)
    lr_scheduler: LrScheduler = msgspec.field(default_factory=LrScheduler)
    parallelism: Parallelism = msgspec.field(default_factory=Parallelism)
    data: Data = msgspec.field(default_factory=Data)
    checkpoint: Checkpoint = msgspec.field(default_factory=Checkpoint)
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    activation_checkpoint: ActivationCheckpoint = msgspec.field(default_factory=ActivationCheckpoint)
    compile: Compile = msgspec.field(default_factory=Compile)
    float8: Float8 = msgspec.field(default_factory=Float8)
    validation: Validation = msgspec.field(default_factory=Validation)
    profiling: Profiling = msgspec.field(default_factory=Profiling)
    comm: Comm = msgspec.field(default_factory=Comm)


# ---------------------------------------------------------------- loading


def shipped_configs() -> dict[str, Path]:
    """The configs installed with the package (configs/*.toml), by name: what `-c NAME` finds."""
    folder = importlib.resources.files("minititan").joinpath("configs")
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".toml")}


def default_config_text() -> str:
    """The packaged configs/debug.toml: the run you get with no -c."""
    return shipped_configs()["debug"].read_text()


def find_config(path: str) -> Path:
    """-c takes a TOML file, or the name of a shipped config (llama3_8b, or llama3_8b.toml) from anywhere."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    if p.parent == Path(".") and p.name.removesuffix(".toml") in shipped:
        return shipped[p.name.removesuffix(".toml")]
    what = "is a folder" if p.is_dir() else "not found"
    raise ConfigError(f"config file {path!r} {what}: pass a TOML file to -c, or a shipped config's name "
                      f"({', '.join(sorted(shipped))})")


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or the packaged debug config), apply overrides, validate."""
    if path is None:
        text = default_config_text()
    else:
        try:
            text = find_config(path).read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file: pass a TOML config to -c") from None
    try:
        raw = msgspec.toml.decode(text)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path or 'debug.toml'} is not valid TOML: {e}") from None
    if not raw:
        raise ConfigError(f"{path} sets no key, so every key would take its struct default: write a full config "
                          f"with `minititan config > {path}` and edit it")
    _check_keys(raw)
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw)


def _sections() -> dict[str, type]:
    return {f.name: f.type for f in msgspec.structs.fields(Config)}


def _fields(section: type) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.name: f for f in msgspec.structs.fields(section)}


def _closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_keys(raw: dict) -> None:
    sections = _sections()
    for sec, body in raw.items():
        if sec not in sections:
            raise ConfigError(f"unknown config section [{sec}]{_closest(sec, sections)}; valid: {', '.join(sections)}")
        if not isinstance(body, dict):
            raise ConfigError(f"[{sec}] must be a table of keys")
        fields = _fields(sections[sec])
        for key in body:
            if key not in fields:
                raise ConfigError(f"unknown config key {sec}.{key}{_closest(key, fields)}; valid keys of [{sec}]: {', '.join(fields)}")


def _apply_override(raw: dict, item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as TOML, else taken as a string."""
    item = item.removeprefix("--")
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    dotted, value = item.split("=", 1)
    sec, key = dotted.split(".", 1)
    _check_keys({sec: {key: None}})
    try:
        parsed = msgspec.toml.decode(f"v = {value}".encode())["v"]
    except msgspec.DecodeError:
        parsed = value  # bare words such as cosine or ./outputs
    if isinstance(parsed, str) and parsed.lower() in ("true", "false"):
        parsed = parsed.lower() == "true"
    if _fields(_sections()[sec])[key].type is str and not isinstance(parsed, str):
        parsed = value  # a string field takes the text as written: selective=2 stays "2"
    raw.setdefault(sec, {})[key] = parsed


def from_dict(raw: dict) -> Config:
    """A Config from its sections as plain values, typed and checked as a TOML file's are."""
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"bad config value: {e}{_choices_hint(str(e))}") from None
    validate(cfg)
    return cfg


def _choices_hint(msg: str) -> str:
    # msgspec says "at `$.section.key`"; add the valid choices of a Literal field
    if "$." not in msg:
        return ""
    path = msg.rsplit("$.", 1)[1].rstrip("`").split(".")
    if len(path) != 2 or path[0] not in _sections():
        return ""
    field = _fields(_sections()[path[0]]).get(path[1])
    args = getattr(field.type, "__args__", None) if field else None
    if args and all(isinstance(a, str) for a in args):
        return f"; valid choices: {', '.join(args)}"
    return ""


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML (every section, every key)."""
    lines = []
    for sec in _sections():
        lines.append(f"[{sec}]")
        for key, value in msgspec.to_builtins(getattr(cfg, sec)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


# ---------------------------------------------------------------- validation


def head_dim(m: Model) -> int:
    """The width of one attention head: model.head_dim, or dim / n_heads when that is 0."""
    return m.head_dim or m.dim // m.n_heads


def hidden_dim(m: Model) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    h = int(m.ffn_dim_multiplier * int(2 * 4 * m.dim / 3))
    return m.multiple_of * math.ceil(h / m.multiple_of)


def validate(cfg: Config) -> None:
    m, t, p = cfg.model, cfg.training, cfg.parallelism
    if m.rope_scaling and not (m.rope_scaling_factor >= 1 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                               and m.rope_original_context > 0):
        raise ConfigError(f"model.rope_scaling needs rope_scaling_factor >= 1, 0 < rope_low_freq_factor < "
                          f"rope_high_freq_factor and rope_original_context > 0; got {m.rope_scaling_factor}, "
                          f"{m.rope_low_freq_factor}, {m.rope_high_freq_factor}, {m.rope_original_context} "
                          f"(Llama 3.1: 8, 1, 4, 8192; Llama 3.2: 32, 1, 4, 8192)")
    _check_ranges(cfg)
    if not m.head_dim and m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads} (or set model.head_dim)")
    if head_dim(m) % 2:
        raise ConfigError(f"head dim {head_dim(m)} must be even for RoPE: change model.head_dim, model.dim or model.n_heads")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"training.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}: raise model.max_seq_len")
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise ConfigError(f"parallelism.dp_shard must be >= 1 or -1 (fill the world), got {p.dp_shard}")
    sel = cfg.activation_checkpoint.selective
    if sel not in ("op", "attention") and not (sel.isdigit() and int(sel) > 0):
        raise ConfigError(f"activation_checkpoint.selective must be \"op\", \"attention\" or a positive integer N "
                          f"(every N-th block), got {sel!r}")
    f8 = cfg.float8
    if f8.fsdp_all_gather and not (f8.enable and f8.recipe == "tensorwise"):
        raise ConfigError("float8.fsdp_all_gather casts weights with one scale per tensor before the all-gather: "
                          "it needs float8.enable = true and float8.recipe = \"tensorwise\" "
                          "(rowwise weights are all-gathered in param_dtype: set float8.fsdp_all_gather = false)")
    if f8.precompute_scale and not f8.fsdp_all_gather:
        raise ConfigError("float8.precompute_scale computes the scales of the fp8 all-gather: "
                          "set float8.fsdp_all_gather = true as well, or float8.precompute_scale = false")
    _validate_data(cfg.data)
    if m.name == "moe":
        _validate_moe(m)


# Keys that only a switch elsewhere in the config turns on: (section, keys, the switch's key, is it
# off?, how to turn it on). Set away from its default while its switch is off, such a key does
# nothing, which is easy to miss (a forgotten --model.name=moe trains a dense model).
def _switches(cfg: Config) -> list[tuple[str, tuple[str, ...], str, bool, str]]:
    m, p = cfg.model, cfg.parallelism
    return [
        ("model", ("moe_frequency", "n_dense_layers", "n_experts", "top_k", "moe_hidden_dim", "n_shared_experts",
                   "shared_expert_gate", "score_func", "route_norm", "route_scale", "aux_loss_coef",
                   "bias_update_rate"), "model.name", m.name != "moe", 'set model.name = "moe"'),
        ("model", ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context"),
         "model.rope_scaling", not m.rope_scaling, "set model.rope_scaling = true"),
        ("parallelism", ("pp_schedule", "pp_microbatches", "pp_virtual_stages", "pp_layers_per_stage"), "parallelism.pp",
         p.pp == 1, "set parallelism.pp > 1"),
        ("parallelism", ("pp_virtual_stages",), "parallelism.pp_schedule",
         p.pp > 1 and p.pp_schedule != "interleaved_1f1b", 'set parallelism.pp_schedule = "interleaved_1f1b"'),
        ("parallelism", ("sequence_parallel",), "parallelism.tp", p.tp == 1, "set parallelism.tp > 1"),
        ("parallelism", ("cp_rotate",), "parallelism.cp", p.cp == 1, "set parallelism.cp > 1"),
        ("activation_checkpoint", ("selective",), "activation_checkpoint.mode",
         cfg.activation_checkpoint.mode != "selective", 'set activation_checkpoint.mode = "selective"'),
        ("lr_scheduler", ("min_lr_ratio",), "lr_scheduler.decay", cfg.lr_scheduler.decay == "constant",
         'set lr_scheduler.decay = "cosine" or "linear"'),
        ("float8", ("recipe", "filter", "force_recompute_weight_in_bwd"), "float8.enable", not cfg.float8.enable,
         "set float8.enable = true"),
        ("validation", ("freq", "steps", "dataset"), "validation.enable", not cfg.validation.enable,
         "set validation.enable = true"),
        ("profiling", ("start_step", "steps"), "profiling.enable", not cfg.profiling.enable, "set profiling.enable = true"),
        # the memory snapshot has its own switch (the out-of-memory error advises it alone); both write to folder
        ("profiling", ("folder",), "profiling.enable", not cfg.profiling.enable and not cfg.profiling.memory_snapshot,
         "set profiling.enable = true or profiling.memory_snapshot = true"),
        ("checkpoint", ("folder", "interval", "keep_latest_k", "resume", "async_save"), "checkpoint.enable",
         not cfg.checkpoint.enable, "set checkpoint.enable = true"),
    ]


def inactive_settings(cfg: Config, overrides: list[str] = ()) -> list[str]:
    """One line per key set away from its default that does nothing under the rest of the config
    (see _switches), for `minititan train` to print as a warning: never a silent no-op. A switch
    turned off by an override is taken as meant: the keys the config file sets under it are quiet
    (--checkpoint.enable=false says nothing of the file's checkpoint.interval)."""
    overridden = {item.removeprefix("--").split("=", 1)[0] for item in overrides}
    default, lines = Config(), []
    for sec, keys, switch, off, turn_on in _switches(cfg):
        if not off:
            continue
        for key in keys:
            value = getattr(getattr(cfg, sec), key)
            if value == getattr(getattr(default, sec), key) or (switch in overridden and f"{sec}.{key}" not in overridden):
                continue
            sec_of, key_of = switch.split(".")
            now = _toml_value(msgspec.to_builtins(getattr(getattr(cfg, sec_of), key_of)))
            lines.append(f"{sec}.{key} = {_toml_value(msgspec.to_builtins(value))} does nothing while {switch} = {now}: "
                         f"{turn_on}, or leave {sec}.{key} out")
    return lines


def _validate_moe(m: Model) -> None:
    if not 1 <= m.top_k <= m.n_experts:
        raise ConfigError(f"model.top_k={m.top_k} must be between 1 and model.n_experts={m.n_experts}")
    if not 0 <= m.n_dense_layers < m.n_layers:
        raise ConfigError(f"model.n_dense_layers={m.n_dense_layers} must be between 0 and model.n_layers - 1 = "
                          f"{m.n_layers - 1}: the blocks after them hold the experts")
    if m.shared_expert_gate and not m.n_shared_experts:
        raise ConfigError("model.shared_expert_gate scales the shared experts' output: set model.n_shared_experts "
                          ">= 1, or model.shared_expert_gate = false")


def _validate_data(d: Data) -> None:
    weights = [s.weight for s in d.sources]
    if any(not math.isfinite(w) or w < 0 for w in weights) or (weights and sum(weights) <= 0):
        raise ConfigError(f"data.sources weights must be >= 0 and not all zero, got {weights}: e.g. "
                          f"sources = [{{path = \"web/\", weight = 0.7}}, {{path = \"code/\", weight = 0.3}}]")
    if not 0 <= d.holdout_fraction < 1:
        raise ConfigError(f"data.holdout_fraction must be in [0, 1), got {d.holdout_fraction}: e.g. 0.01")
    if d.prefetch < 0:
        raise ConfigError(f"data.prefetch must be >= 0 (0: no background thread), got {d.prefetch}")


# Every number a config holds, with what it must be: (key, value, ok(value), what it must be).
# A NaN fails every comparison, so each check is written as what is allowed, never as what is not.
def _finite(v) -> bool:
    return math.isfinite(v)


def _positive(v) -> bool:
    return _finite(v) and v > 0


def _non_negative(v) -> bool:
    return _finite(v) and v >= 0


def _fraction(v) -> bool:  # [0, 1]
    return _finite(v) and 0 <= v <= 1


def _ranges(cfg: Config) -> list[tuple[str, Any, Any, str]]:
    m, t, o, p = cfg.model, cfg.training, cfg.optimizer, cfg.parallelism
    positive = [("model.dim", m.dim), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                ("model.n_kv_heads", m.n_kv_heads), ("model.vocab_size", m.vocab_size),
                ("model.multiple_of", m.multiple_of), ("model.max_seq_len", m.max_seq_len),
                ("model.ffn_dim_multiplier", m.ffn_dim_multiplier), ("model.norm_eps", m.norm_eps),
                ("model.rope_theta", m.rope_theta), ("model.rope_scaling_factor", m.rope_scaling_factor),
                ("model.rope_low_freq_factor", m.rope_low_freq_factor),
                ("model.rope_high_freq_factor", m.rope_high_freq_factor),
                ("model.rope_original_context", m.rope_original_context), ("model.moe_frequency", m.moe_frequency),
                ("model.n_experts", m.n_experts), ("model.top_k", m.top_k), ("model.route_scale", m.route_scale),
                ("training.steps", t.steps), ("training.seq_len", t.seq_len),
                ("training.local_batch_size", t.local_batch_size), ("optimizer.lr", o.lr), ("optimizer.eps", o.eps),
                ("parallelism.dp_replicate", p.dp_replicate), ("parallelism.tp", p.tp), ("parallelism.pp", p.pp),
                ("parallelism.cp", p.cp), ("parallelism.ep", p.ep),
                ("parallelism.pp_virtual_stages", p.pp_virtual_stages), ("metrics.log_freq", cfg.metrics.log_freq),
                ("checkpoint.interval", cfg.checkpoint.interval), ("validation.freq", cfg.validation.freq),
                ("validation.steps", cfg.validation.steps), ("profiling.start_step", cfg.profiling.start_step),
                ("profiling.steps", cfg.profiling.steps), ("comm.timeout_s", cfg.comm.timeout_s)]
    non_negative = [("model.head_dim", m.head_dim), ("model.n_dense_layers", m.n_dense_layers),
                    ("model.moe_hidden_dim", m.moe_hidden_dim), ("model.n_shared_experts", m.n_shared_experts),
                    ("model.aux_loss_coef", m.aux_loss_coef), ("model.bias_update_rate", m.bias_update_rate),
                    ("training.global_batch_size", t.global_batch_size), ("training.seed", t.seed),
                    ("training.max_norm", t.max_norm), ("training.skip_nonfinite_steps", t.skip_nonfinite_steps),
                    ("optimizer.weight_decay", o.weight_decay), ("lr_scheduler.warmup_steps",
                                                                 cfg.lr_scheduler.warmup_steps),
                    ("parallelism.pp_microbatches", p.pp_microbatches),
                    ("parallelism.ep_capacity_factor", p.ep_capacity_factor),
                    ("checkpoint.keep_latest_k", cfg.checkpoint.keep_latest_k)]
    out = [(k, v, _positive, "a positive number") for k, v in positive]
    out += [(k, v, _non_negative, "zero or a positive number") for k, v in non_negative]
    out += [("lr_scheduler.min_lr_ratio", cfg.lr_scheduler.min_lr_ratio, _fraction, "between 0 and 1"),
            ("optimizer.betas", o.betas, lambda b: len(b) == 2 and all(_finite(x) and 0 <= x < 1 for x in b),
             "two numbers in [0, 1), e.g. [0.9, 0.95]"),
            ("training.seed", t.seed, lambda v: v < 2**63, "below 2**63"),
            ("comm.timeout_s", cfg.comm.timeout_s, lambda v: v <= 10**7, "at most 10**7 seconds"),
            ("model.max_seq_len", m.max_seq_len, lambda v: v <= 2**24, "at most 2**24 (the RoPE table has a row "
             "for each position)"),
            ("model.n_layers", m.n_layers, lambda v: v <= 10**4, "at most 10,000 (every layer is named tensors "
             "that setup and the dry run walk one by one; the largest published models have a few hundred)"),
            ("optimizer.lr", o.lr, lambda v: v * o.weight_decay < 1,
             f"below 1 / optimizer.weight_decay ({o.weight_decay}), or each step would shrink the weights past zero"),
            ("parallelism.pp_layers_per_stage", p.pp_layers_per_stage, lambda v: all(n >= 1 for n in v),
             "a list of positive layer counts (or [] to balance)")]
    return out


MEANING = {  # what a key's special values mean, added to its range error
    "model.head_dim": "0 = dim / n_heads", "model.moe_frequency": "1 = every block is MoE",
    "model.route_scale": "1 = the scores as they are", "model.moe_hidden_dim": "0 = the dense hidden dim",
    "training.global_batch_size": "0 = local_batch_size x data-parallel ranks", "training.max_norm": "0 = no clipping",
    "training.skip_nonfinite_steps": "0 = the first non-finite step stops the run",
    "parallelism.pp_microbatches": "0 = local_batch_size", "parallelism.ep_capacity_factor": "0 = exact all-to-all",
    "checkpoint.keep_latest_k": "0 = keep all"}


def _check_ranges(cfg: Config) -> None:
    for key, value, ok, what in _ranges(cfg):
        if not ok(value):
            meaning = f" ({MEANING[key]})" if key in MEANING else ""
            raise ConfigError(f"{key} must be {what}{meaning}, got {value}")
