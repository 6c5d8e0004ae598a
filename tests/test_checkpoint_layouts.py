"""A checkpoint saved under one layout resumes under another, and training goes on as if nothing
had changed: after resuming at step 3 in a new layout, steps 4..6 log the losses of the
uninterrupted one-process run (fp32, relative difference < 1e-6) and end with its parameters.

Each pair trains 6 steps under its first layout with a checkpoint at step 3 (the lr schedule needs
the full 6-step run), drops the step-6 checkpoint, and trains again in the same folder under its
second layout, which resumes from step 3. Two of the runs save asynchronously.

The final parameters are held to 1e-5, as in the layout parity tests: the layouts themselves, run
without interruption, already end 1.5e-6 to 4.4e-6 away from the one-process parameters (AdamW
turns reordered gradient sums into slightly different updates where gradients are near zero), and
a resumed run ends as far away as its resuming layout does. Starting ranks costs more than training
the tiny model, so all 4-rank runs share one set of ranks."""
import shutil
from pathlib import Path

import torch.distributed as dist

from minititan.core.config import load_config
from minititan.train import train
from tests.distributed import run_ranks
from tests.harness import TINY, assert_same_losses, assert_same_params, finished_run

LOSS_RTOL = 1e-6  # measured: at most 8.5e-8, one float32 ulp of the loss
PARAM_RTOL = 1e-5
AT_3 = ["checkpoint.interval=3"]
MOE = ["model.name=moe", "model.n_experts=4", "model.moe_hidden_dim=64", "model.n_shared_experts=1",
       "model.bias_update_rate=0.01"]

# name: (reference, overrides of the layout that saves, overrides of the layout that resumes); 4 ranks each
PAIRS = {
    "dp_shard4_to_tp2_pp2": ("dense", ["parallelism.dp_shard=4", "checkpoint.async_save=true"],
                             ["parallelism.tp=2", "parallelism.pp=2"]),
    "pp2_tp2_to_dp_shard2_cp2": ("dense", ["parallelism.pp=2", "parallelism.tp=2"],
                                 ["parallelism.dp_shard=2", "parallelism.cp=2", "checkpoint.async_save=true"]),
    "dp_replicate2_tp2_to_pp2_dp_shard2": ("dense", ["parallelism.dp_replicate=2", "parallelism.tp=2"],
                                           ["parallelism.pp=2", "parallelism.dp_shard=2"]),
    "one_process_to_dp_shard2_tp2": ("dense", None, ["parallelism.dp_shard=2", "parallelism.tp=2"]),
    "moe_dp_shard4_ep4_to_tp2_dp_shard2_ep2": ("moe", ["parallelism.dp_shard=4", "parallelism.ep=4"],
                                               ["parallelism.tp=2", "parallelism.dp_shard=2", "parallelism.ep=2"]),
}
REFERENCES = {"dense": [], "moe": MOE}


def _train_all(rank, world, runs):
    return [train(load_config(None, overrides)) for overrides in runs]


def _save_then_resume(rank, world, saves, resumes, folders):
    saved = [train(load_config(None, overrides)) for overrides in saves]
    dist.barrier()
    if rank == 0:
        for folder in folders:
            shutil.rmtree(Path(folder) / "checkpoints" / "step-00000006", ignore_errors=True)
    dist.barrier()
    return saved, [train(load_config(None, overrides)) for overrides in resumes]


def _run_all_pairs(base: Path) -> dict:
    """name -> (reference rows and params, rows of the saving run (None: the reference saved),
    rows and params after the resume, the checkpoints folder)."""
    ref_runs = [TINY + AT_3 + extra + [f"job.dump_folder={base / ref}"] for ref, extra in REFERENCES.items()]
    ref_rows = run_ranks(1, _train_all, ref_runs)[0]
    refs = {ref: finished_run(o, rows) for ref, o, rows in zip(REFERENCES, ref_runs, ref_rows)}
    saves, resumes = [], []
    for name, (ref, save_layout, resume_layout) in PAIRS.items():
        common = TINY + AT_3 + REFERENCES[ref] + [f"job.dump_folder={base / name}"]
        if save_layout is None:  # the one-process reference saved it
            shutil.copytree(base / ref / "checkpoints" / "step-00000003", base / name / "checkpoints" / "step-00000003")
        else:
            saves.append(common + save_layout)
        resumes.append(common + resume_layout)
    saved, resumed = run_ranks(4, _save_then_resume, saves, resumes, [str(base / name) for name in PAIRS])[0]
    saved = iter(saved)
    return {name: (refs[ref], None if save_layout is None else next(saved), *finished_run(overrides, rows),
                   base / name / "checkpoints")
            for (name, (ref, save_layout, _)), overrides, rows in zip(PAIRS.items(), resumes, resumed)}


def _check_pair(ref, saved_rows, rows, params, folder) -> None:
    ref_rows, ref_params = ref
    if saved_rows is not None:
        assert_same_losses(saved_rows, ref_rows, rtol=LOSS_RTOL)  # the saving layout itself matches
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert_same_losses(rows, ref_rows[3:], rtol=LOSS_RTOL)
    assert_same_params(params, ref_params, rtol=PARAM_RTOL)
    # only complete checkpoints are left: no .tmp folders, no async completion markers
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003", "step-00000006"]
    assert all(f.name == "manifest.json" or f.suffix == ".safetensors" for f in folder.glob("*/*"))


def test_resume_under_another_layout(tmp_path):
    # one test, not one per pair: pytest-xdist would build a shared fixture once per worker
    failures = []
    for name, result in _run_all_pairs(tmp_path).items():
        try:
            _check_pair(*result)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
