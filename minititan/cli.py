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

from minititan.core.config import UserError, config_to_toml, load_config


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
    """Turn UserErrors into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


OVERRIDES = dict(context_settings=dict(ignore_unknown_options=True, allow_extra_args=True))


@click.group(cls=FriendlyGroup)
def main():
    """minititan: minimal LLM pre-training on torch.distributed."""


@main.command(**OVERRIDES)
@click.option("-c", "--config", "config_path", default=None, help="TOML config (default: the built-in debug.toml)")
@click.option("--nproc", type=int, default=None, help="launch N local ranks with torch.distributed.run")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def train(config_path, nproc, overrides):
    """Train a model. Overrides: --section.key=value."""
    cfg = load_config(config_path, split_overrides(overrides))  # fail fast, before any launch
    if nproc and "WORLD_SIZE" not in os.environ:
        check_layout_once(cfg, nproc)
        launch(nproc, config_path, overrides)
        return
    from minititan.collectives.mesh import adopt_slurm_env, close_distributed
    adopt_slurm_env()  # srun without torchrun: this process is one of SLURM_NTASKS ranks
    check_layout_once(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from minititan.train import train as run_training
    try:
        run_training(cfg)
    except BaseException:
        close_distributed(clean=False)
        raise
    close_distributed()
    if _is_rank0() and cfg.data.tokenizer == "byte" and cfg.data.dataset == "shakespeare" and cfg.checkpoint.enable:
        print_sample(cfg)


def check_layout_once(cfg, world: int) -> None:
    """The layout's refusals for this world size, printed once: every rank of a torchrun job
    would refuse the same config the same way, so the others exit without repeating it."""
    from minititan.layout.parallelize import check
    try:
        check(cfg, world)
    except UserError:
        if _is_rank0():
            raise
        sys.exit(2)


def launch(nproc: int, config_path, overrides) -> None:
    """Re-run this command in N processes through torch's elastic launcher (what torchrun is)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    # the cores shared out among the ranks (torchrun's default is 1 thread each, with a warning)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    args = ["--standalone", "--nproc_per_node", str(nproc), "-m", "minititan.cli", "train"]
    args += ["-c", config_path] if config_path else []
    try:
        torchrun(args + list(overrides))
    except ChildFailedError as e:  # the rank already printed its error; don't add the launcher's traceback
        code = next(iter(e.failures.values())).exitcode
        click.echo(f"error: a rank exited with code {code} (see its message above)", err=True)
        sys.exit(code if code > 0 else 1)


def print_sample(cfg) -> None:
    from minititan.core import checkpoint as ckpt
    from minititan.generate import generate_text, load_for_inference
    path = ckpt.latest(Path(cfg.job.dump_folder) / cfg.checkpoint.folder)
    if path is None:
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
@click.option("--checkpoint", "checkpoint_path", required=True, help="a step-N checkpoint folder")
@click.option("--prompt", default="ROMEO:")
@click.option("--max-new-tokens", default=200)
@click.option("--temperature", default=0.8)
@click.option("--top-k", default=40)
@click.option("--seed", default=0)
def generate(checkpoint_path, prompt, max_new_tokens, temperature, top_k, seed):
    """Sample text from a checkpoint."""
    from minititan.generate import generate_text, load_for_inference
    cfg, params = load_for_inference(checkpoint_path)
    click.echo(generate_text(params, cfg, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed))


@main.command()
@click.argument("metrics_file")
@click.option("-o", "--out", default=None, help="SVG path (default: beside the metrics file)")
def plot(metrics_file, out):
    """Write an SVG chart of loss and throughput from metrics.jsonl (and a MoE model's expert-load heat-map)."""
    from minititan.plot import read_rows, to_svg
    if not Path(metrics_file).is_file():
        raise UserError(f"{metrics_file} not found: pass the metrics.jsonl of a run (job.dump_folder)")
    out = out or str(Path(metrics_file).with_suffix(".svg"))
    rows = read_rows(metrics_file)
    Path(out).write_text(to_svg(rows))
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
@click.option("--shard-tokens", type=int, default=None, help="tokens per shard  [default: 100,000,000]")
@click.option("--workers", type=int, default=None, help="worker processes  [default: one per core]")
@click.option("--bos", default=None, help="token (or id) before each document  [default: none]")
@click.option("--eos", default=None, help="token (or id) after each document, or none  [default: the tokenizer's]")
def tokenize(paths, tokenizer, text_field, shard_tokens, workers, bos, eos):
    """Tokenize INPUTS... (files, folders, globs of .txt .jsonl .jsonl.gz .parquet) into shards in the
    folder OUT (the last path), for data.dataset / data.sources. Rerun the same command to resume.
    An OUT ending in .bin writes one token file instead (no separators unless --eos)."""
    from minititan.data.tokenize_corpus import DEFAULT_SHARD_TOKENS, tokenize_corpus, tokenize_to_file
    if len(paths) < 2:
        raise UserError("pass the inputs and then the output folder: minititan tokenize corpus/ tokens/")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be >= 0 (0: tokenize in this process), got {workers}")
    *inputs, out = paths
    if out.endswith(".bin"):
        n = tokenize_to_file(inputs, out, tokenizer, text_field, workers, bos, eos)
        click.echo(f"wrote {n:,} tokens to {out}")
        return
    try:
        done = tokenize_corpus(inputs, out, tokenizer, text_field, shard_tokens or DEFAULT_SHARD_TOKENS, workers, bos,
                               eos)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished shards in {out} are kept; run the same command again to resume",
                   err=True)
        sys.exit(130)
    resumed = f" ({done['resumed_shards']} finished before)" if done["resumed_shards"] else ""
    click.echo(f"wrote {done['shards']} shard(s){resumed} to {out}: {done['tokens']:,} tokens, "
               f"{done['documents']:,} documents\ntrain on them: minititan train --data.dataset={out}")


@main.command()
@click.option("--pp", type=int, required=True, help="pipeline ranks")
@click.option("--microbatches", type=int, required=True)
@click.option("--schedule", default="1f1b", help="gpipe | 1f1b | interleaved_1f1b | zero_bubble")
@click.option("--virtual", type=int, default=1, help="stages per rank (interleaved_1f1b: >= 2)")
@click.option("--svg", "svg_path", default=None, help="also write the timeline as SVG")
def schedule(pp, microbatches, schedule, virtual, svg_path):
    """Draw a pipeline schedule's timeline and its bubble fraction."""
    from minititan.schedules import viewer
    try:
        viewer.main(pp, microbatches, schedule, virtual, svg_path)
    except ValueError as e:
        raise UserError(str(e)) from None


@main.group()
def convert():
    """Convert Llama, Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints to and from Hugging Face's format."""


@convert.command("hf-to-minititan")
@click.argument("hf_dir")
@click.argument("out_dir")
def convert_hf_to_minititan(hf_dir, out_dir):
    """HF_DIR (config.json + *.safetensors) -> OUT_DIR/step-00000000."""
    from minititan.convert import hf_to_minititan
    path = hf_to_minititan(hf_dir, out_dir)
    click.echo(f"wrote {path}\nfine-tune: minititan train -c {Path(out_dir) / 'config.toml'} --checkpoint.load_path={path}"
               f"\nsample:    minititan generate --checkpoint {path}")


@convert.command("minititan-to-hf")
@click.argument("ckpt_dir")
@click.argument("out_dir")
def convert_minititan_to_hf(ckpt_dir, out_dir):
    """CKPT_DIR (a step-N folder, or a folder of them: the newest) -> OUT_DIR/config.json + model.safetensors."""
    from minititan.convert import minititan_to_hf
    click.echo(f"wrote {minititan_to_hf(ckpt_dir, out_dir)}")


if __name__ == "__main__":
    main()
