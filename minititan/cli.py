"""The `minititan` command: train, config, generate, plot, tokenize, schedule, convert.

    minititan train                          the built-in debug run (tiny model, Shakespeare, CPU ok)
    minititan train -c configs/llama3_8b.toml --training.steps=100 --parallelism.dp_shard=-1
    minititan train --nproc 4 ...            4 local ranks through torch.distributed.run
    torchrun --nproc_per_node 8 -m minititan.cli train -c ...   the same under torchrun / srun

Overrides are `--section.key=value` or `--section.key value` (torchtitan style). Bad input ends in
one line on stderr naming the fix, exit code 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from minititan.core.config import (AgreedError, UserError, config_to_toml, inactive_settings, load_config,
                                   shipped_configs)


def split_overrides(args: tuple[str, ...]) -> list[str]:
    """['--a.b=1', '--c.d', '2', '--e.f'] -> ['a.b=1', 'c.d=2', 'e.f=true']."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        if "=" in arg:
            out.append(arg[2:])
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{arg[2:]}={args[i + 1]}")
            i += 1
        else:
            out.append(f"{arg[2:]}=true")
        i += 1
    return out


class FriendlyGroup(click.Group):
    """Turn UserErrors and click's usage errors (a bad flag value, a missing option) into one line
    and exit code 2. An AgreedError, which every rank of a job raises alike, is printed by rank 0 alone."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if _is_rank0() or not isinstance(e, AgreedError):
                click.echo(f"error: {e}", err=True)
            sys.exit(2)

    def main(self, args=None, prog_name=None, **kwargs):
        try:
            code = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "minititan"
            click.echo(f"error: {e.format_message()} (`{where} --help` lists the options)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


OVERRIDES = dict(context_settings=dict(ignore_unknown_options=True, allow_extra_args=True))


@click.group(cls=FriendlyGroup)
def main():
    """minititan: minimal LLM pre-training on torch.distributed."""


TRAIN_HELP = f"""Train a model: the built-in debug config, or -c FILE, or -c NAME of a shipped config
({', '.join(sorted(shipped_configs()))}), with overrides --section.key=value.

\b
Config sections:
  [job]                    dump_folder (metrics.jsonl, checkpoints), description
  [model]                  name (llama3 | moe), dim, n_layers, n_heads, vocab_size, MoE keys, ...
  [training]               steps, seq_len, global/local_batch_size, seed, dtypes, max_norm, device, ...
  [optimizer]              lr, betas, eps, weight_decay, implementation
  [lr_scheduler]           warmup_steps, decay, min_lr_ratio
  [parallelism]            dp_replicate, dp_shard, tp, pp, cp, ep, pipeline schedule, ...
  [data]                   dataset, tokenizer
  [checkpoint]             enable, folder, interval, keep_latest_k, load_path, resume, async_save
  [metrics]                log_freq, jsonl
  [activation_checkpoint]  mode, selective
  [compile] [float8] [validation] [profiling] [comm]

`minititan config [-c FILE] [overrides]` prints every key with its value; each key is described in
minititan/core/config.py.
"""


@main.command(help=TRAIN_HELP, **OVERRIDES)
@click.option("-c", "--config", "config_path", default=None,
              help="TOML config file, or a shipped config's name (default: the built-in debug config)")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="launch N local ranks with torch.distributed.run")
@click.option("--dry-run", is_flag=True, help="set up and step the ranks on fake tensors (no device, no launch): "
              "the job's errors and memory in seconds; the world is --nproc (or WORLD_SIZE)")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def train(config_path, nproc, dry_run, overrides):
    pairs = split_overrides(overrides)
    cfg = load_config(config_path, pairs)  # fail fast, before any launch
    launching = nproc and "WORLD_SIZE" not in os.environ and not dry_run  # this process starts the ranks
    if _is_rank0() and not launching:  # once a job: here, or in its rank 0
        from minititan.layout.parallelize import uncompiled_blocks
        for line in inactive_settings(cfg, pairs) + uncompiled_blocks(cfg):
            click.echo(f"warning: {line}")
    if dry_run:
        from minititan.plan.command import run_dry_train
        run_dry_train(cfg, nproc or int(os.environ.get("WORLD_SIZE", "1")))
        return
    if launching:
        check_before_start(cfg, nproc, in_rank=False)
        launch(nproc, config_path, overrides)
        return
    from minititan.collectives.mesh import adopt_slurm_env, close_distributed
    from minititan.core.memory import is_out_of_memory
    from minititan.core.preemption import die_with_launcher
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun or --nproc: stop when it dies
        die_with_launcher()
    adopt_slurm_env()  # srun without torchrun: this process is one of SLURM_NTASKS ranks
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_before_start(cfg, world, in_rank=True)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from minititan.train import train as run_training
    try:
        run_training(cfg)
    except AgreedError:
        close_distributed()  # every rank raised it at the same point, past every collective: close as usual
        raise
    except Exception as e:
        if is_out_of_memory(e):  # while setting up (the loop names the step itself)
            e = UserError(f"out of memory while setting up the model and optimizer ({str(e).splitlines()[0]}): "
                          f"train a smaller model, or shard it over more ranks (parallelism.dp_shard, tp, pp)")
        if world == 1:
            close_distributed()
            raise e from None
        leave_alone(e)
    close_distributed()
    if _is_rank0() and cfg.data.tokenizer == "byte" and cfg.data.dataset == "shakespeare" and cfg.checkpoint.enable:
        print_sample(cfg)


def leave_alone(e: Exception) -> None:
    """A rank failing on its own: the others may be inside a collective, which destroying the
    process group would wait on, and leaving it to the interpreter's exit can abort the process
    (gloo's threads still hold tensors while Python shuts down: SIGABRT, and the launcher would
    report a crash instead of the error). So: the message, then exit at once, as the launcher
    stops the other ranks anyway. A UserError is one line and code 2; a collective whose peer went
    away, one line (the peer's own error says why); anything else, its traceback and code 1."""
    import traceback
    if isinstance(e, UserError):
        click.echo(f"error: {e}", err=True)
    elif peer_gone(e):
        click.echo(f"error: rank {os.environ.get('RANK', '?')}: another rank left the job during a collective "
                   f"(its own error, above or below, says why)", err=True)
    else:
        traceback.print_exception(e)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2 if isinstance(e, UserError) else 1)


def peer_gone(e: Exception) -> bool:
    """Whether a collective failed because another rank left: gloo's words for it, and NCCL's."""
    return any(words in str(e) for words in PEER_GONE)


PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",  # gloo
             "remote process exited or there was a network error")  # NCCL (ncclRemoteError)


def check_before_start(cfg, world: int, in_rank: bool) -> None:
    """Every refusal that needs only the config, the files and the world size, printed once: every
    rank of a torchrun job would refuse the same config the same way, so the others exit without
    repeating it. The layout; a model too big for the device; job.dump_folder; the resume (resume.py)."""
    from minititan import resume
    from minititan.core.memory import check_device_fits
    from minititan.layout.parallelize import check, mesh_sizes, with_global_batch
    try:
        cfg = with_global_batch(cfg, world)
        check(cfg, world)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        check_device_fits(cfg, mesh_sizes(cfg, world), local_ranks, in_rank)
        check_writable(cfg.job.dump_folder, "job.dump_folder", "set --job.dump_folder to")
        if cfg.checkpoint.enable:
            check_writable(resume.checkpoint_folder(cfg), "checkpoint.folder", "set --checkpoint.folder to")
        resume.check_start(cfg)
    except UserError:
        if _is_rank0():
            raise
        sys.exit(2)


def check_writable(folder, what: str, fix: str) -> None:
    """The folder exists or can be made, and a file can be written in it; else one line: what, then fix."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {str(folder)!r} is a file, not a folder: {fix} a folder path")
    probe = path / f".minititan-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {str(folder)!r} cannot be written ({e.strerror}): {fix} a folder you can "
                        f"write to") from None


def launch(nproc: int, config_path, overrides) -> None:
    """Re-run this command in N processes through torch's elastic launcher (what torchrun is).
    SIGTERM / SIGINT are not the launcher's to handle (it would raise, print a traceback and kill
    the ranks 30 s later): core/preemption.py passes them on, and the ranks checkpoint and exit 0."""
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from minititan.core.preemption import forward_to_ranks
    # the cores shared out among the ranks (torchrun's default is 1 thread each, with a warning)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    for name in list(logging.Logger.manager.loggerDict):  # the ranks say what went wrong; the agent would repeat it
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    forward_to_ranks()
    args = ["--standalone", "--nproc_per_node", str(nproc), "--signals-to-handle", "SIGHUP,SIGQUIT",
            "-m", "minititan.cli", "train"]
    args += ["-c", config_path] if config_path else []
    try:
        torchrun(args + list(overrides))
    except ChildFailedError as e:  # the rank already printed its error; don't add the launcher's traceback
        rank, failure = cause_of(e)
        if failure.exitcode == 2:  # a UserError: rank 0 printed its one line
            sys.exit(2)
        if failure.exitcode < 0:
            click.echo(f"error: rank {rank} was killed by {signal.Signals(-failure.exitcode).name} and the job "
                       f"stopped: rerun the same command to resume from the newest checkpoint", err=True)
            sys.exit(1)
        click.echo(f"error: rank {rank} exited with code {failure.exitcode} (its message is above)", err=True)
        sys.exit(failure.exitcode)


def cause_of(e):
    """(rank, failure) that ended the job (e: torchrun's ChildFailedError): a rank's UserError (exit
    2), else a rank killed by a signal, else the first failure. The others' failures (a collective
    whose peer left) follow from the cause, and their timestamps (whole seconds) may tie with it."""
    failures = e.failures.items()
    return (next(((r, f) for r, f in failures if f.exitcode == 2), None)
            or next(((r, f) for r, f in failures if f.exitcode < 0), None)
            or e.get_first_failure())


def print_sample(cfg) -> None:
    from minititan.core import checkpoint as ckpt
    from minititan.generate import generate_text, load_for_inference
    path = ckpt.latest(Path(cfg.job.dump_folder) / cfg.checkpoint.folder)
    if path is None or int(path.name.split("-")[1]) < cfg.training.steps:  # stopped early (a signal): no sample
        return
    saved_cfg, params = load_for_inference(path)
    click.echo("\n--- sample ---\n" + generate_text(params, saved_cfg, "ROMEO:", max_new_tokens=160) + "\n--------------")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


@main.command(**OVERRIDES)
@click.option("-c", "--config", "config_path", default=None)
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def config(config_path, overrides):
    """Print the resolved config as TOML."""
    click.echo(config_to_toml(load_config(config_path, split_overrides(overrides))), nl=False)


@main.command()
@click.option("--checkpoint", "checkpoint_path", required=True,
              help="a step-N checkpoint folder, or a folder of them (the newest is used)")
@click.option("--prompt", default="ROMEO:", show_default=True, help="the text the sample continues")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=200, show_default=True,
              help="how many tokens to sample")
@click.option("--temperature", type=float, default=0.8, show_default=True,
              help="sampling temperature: lower is more predictable; 0 always takes the most likely token")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True,
              help="sample among the k most likely tokens only; 0 = among all")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="the sampling's random seed")
def generate(checkpoint_path, prompt, max_new_tokens, temperature, top_k, seed):
    """Sample text from a checkpoint."""
    import math

    from minititan.generate import generate_text, load_for_inference
    if not prompt:
        raise UserError("--prompt is empty: give the text to continue, e.g. --prompt \"ROMEO:\"")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}")
    cfg, params = load_for_inference(checkpoint_path, advice="pass another step-N folder to --checkpoint")
    click.echo(generate_text(params, cfg, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed))


@main.command()
@click.argument("metrics_file")
@click.option("-o", "--out", default=None, help="SVG path (default: beside the metrics file)")
def plot(metrics_file, out):
    """Write an SVG chart of loss and throughput from metrics.jsonl (and a MoE model's expert-load heat-map)."""
    from minititan.plot import read_rows, to_svg
    if not Path(metrics_file).is_file():
        raise UserError(f"{metrics_file} not found: pass the metrics.jsonl of a run (in its job.dump_folder)")
    out = out or str(Path(metrics_file).with_suffix(".svg"))
    rows = read_rows(metrics_file)
    try:
        Path(out).write_text(to_svg(rows))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}): pass -o with a path in a folder you can write to") from None
    click.echo(f"wrote {out}")
    from minititan.moe_heatmap import write_load_heatmap
    heatmap = write_load_heatmap(rows, out)  # a mixture of experts' loads per layer, if logged
    if heatmap:
        click.echo(f"wrote {heatmap}")


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="INPUTS... OUT")
@click.option("--tokenizer", default="byte", show_default=True,
              help="byte, a Hugging Face tokenizer.json (needs `tokenizers`) or a tiktoken BPE file (needs `tiktoken`)")
@click.option("--text-field", default="text", show_default=True, help="the jsonl field / parquet column of the text")
@click.option("--shard-tokens", type=click.IntRange(min=1), default=None, help="tokens per shard  [default: 100,000,000]")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="worker processes, 0: tokenize in this process  [default: one per core]")
@click.option("--bos", default=None, help="token (or id) before each document  [default: none]")
@click.option("--eos", default=None, help="token (or id) after each document, or none  [default: the tokenizer's]")
def tokenize(paths, tokenizer, text_field, shard_tokens, workers, bos, eos):
    """Tokenize INPUTS... (files, folders, globs of .txt .jsonl .jsonl.gz .parquet) into shards in the
    folder OUT (the last path), for data.dataset / data.sources. Rerun the same command to resume.
    An OUT ending in .bin writes one token file instead (no separators unless --eos)."""
    from minititan.data.tokenize_corpus import DEFAULT_SHARD_TOKENS, tokenize_corpus, tokenize_to_file
    if len(paths) < 2:
        raise UserError("pass the inputs and then the output folder: minititan tokenize corpus/ tokens/")
    *inputs, out = paths
    if out.endswith(".bin"):
        n = tokenize_to_file(inputs, out, tokenizer, text_field, workers, bos, eos)
        click.echo(f"wrote {n:,} tokens to {out}")
        return
    try:
        done = tokenize_corpus(inputs, out, tokenizer, text_field,
                               DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens, workers, bos, eos)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished shards in {out} are kept; run the same command again to resume",
                   err=True)
        sys.exit(130)
    resumed = f" ({done['resumed_shards']} finished before)" if done["resumed_shards"] else ""
    click.echo(f"wrote {done['shards']} shard(s){resumed} to {out}: {done['tokens']:,} tokens, "
               f"{done['documents']:,} documents\ntrain on them: minititan train --data.dataset={out}")


@main.command()
@click.option("--pp", type=click.IntRange(min=1), required=True, help="pipeline ranks")
@click.option("--microbatches", type=click.IntRange(min=1), required=True, help="microbatches per step")
@click.option("--schedule", default="1f1b", show_default=True, help="gpipe | 1f1b | interleaved_1f1b | zero_bubble")
@click.option("--virtual", type=click.IntRange(min=1), default=1, show_default=True,
              help="stages per rank (interleaved_1f1b: >= 2)")
@click.option("--svg", "svg_path", default=None, help="also write the timeline as SVG")
def schedule(pp, microbatches, schedule, virtual, svg_path):
    """Draw a pipeline schedule's timeline and its bubble fraction."""
    from minititan.schedules import viewer
    try:
        viewer.main(pp, microbatches, schedule, virtual, svg_path)
    except ValueError as e:
        raise UserError(str(e)) from None


@main.command(**OVERRIDES)
@click.option("-c", "--config", "config_path", default=None)
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="GPUs in the job (the world size)")
@click.option("--gpu", default="h100", help="h100 | h200 | b200, or a profile .toml (from --calibrate)")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=8, help="GPUs per node: NVLink inside one, the network across")
@click.option("--layout", default=None, help="one layout's breakdown: dp_shard=8,tp=2,pp=2,pp_schedule=1f1b,ac=full,batch=2")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--top", type=click.IntRange(min=1), default=10, help="layouts to list")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="dry-run processes (default: one per core)")
@click.option("--calibrate", "calibrate_out", default=None, help="measure this GPU and write its profile to this .toml")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def plan(config_path, gpus, gpu, gpus_per_node, layout, as_json, top, workers, calibrate_out, overrides):
    """Memory and speed of every layout (or one) before launch, from dry runs on fake tensors."""
    if calibrate_out:
        from minititan.plan.calibrate import calibrate
        calibrate(calibrate_out)
        return
    pairs = split_overrides(overrides)
    cfg = load_config(config_path, pairs)
    if gpus is None:
        raise UserError("minititan plan needs --gpus N: the GPUs the job runs on")
    from minititan.plan.command import run_plan
    run_plan(cfg, {p.split("=", 1)[0] for p in pairs}, gpus, gpu, gpus_per_node, layout, as_json, top, workers)


@main.group()
def convert():
    """Convert Llama, Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints to and from Hugging Face's format."""


@convert.command("hf-to-minititan")
@click.argument("hf_dir")
@click.argument("out_dir")
def convert_hf_to_minititan(hf_dir, out_dir):
    """HF_DIR (config.json + *.safetensors) -> OUT_DIR/step-00000000."""
    from minititan.convert import hf_to_minititan
    check_writable(out_dir, "OUT_DIR", "pass as OUT_DIR")
    path = hf_to_minititan(hf_dir, out_dir)
    click.echo(f"wrote {path}\nfine-tune: minititan train -c {Path(out_dir) / 'config.toml'} --checkpoint.load_path={path}"
               f"\nsample:    minititan generate --checkpoint {path}")


@convert.command("minititan-to-hf")
@click.argument("ckpt_dir")
@click.argument("out_dir")
def convert_minititan_to_hf(ckpt_dir, out_dir):
    """CKPT_DIR (a step-N folder, or a folder of them: the newest) -> OUT_DIR/config.json + model.safetensors."""
    from minititan.convert import minititan_to_hf
    check_writable(out_dir, "OUT_DIR", "pass as OUT_DIR")
    click.echo(f"wrote {minititan_to_hf(ckpt_dir, out_dir)}")


if __name__ == "__main__":
    main()
