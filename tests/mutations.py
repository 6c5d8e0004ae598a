"""Deliberate bugs the test suite must catch, one at a time, on a copy of the repository.

    python -m tests.mutations                  # every mutation; the table at the end
    python -m tests.mutations -k ring -k cp    # those whose name contains "ring" or "cp"
    python -m tests.mutations --check          # only that every pattern still matches once
    python -m tests.mutations --baseline       # the named tests pass on the unmutated copy
    python -m tests.mutations --markdown FILE  # also write the table as Markdown

On demand, not in CI (pytest does not collect this file): all of them take 3 to 8 minutes
on 2 shared cores.

Each mutation is a bug that matters in distributed training, written as exact text replacements
(file, the text, its replacement) that must each match exactly once: after a refactor moves the
text, the tool says which pattern no longer matches instead of silently testing nothing. For each
mutation the repository (minititan/, tests/, configs/) is copied to a fresh temporary folder, the
copy is patched, the patched modules must import, and the tests named for the mutation run there
(python -m pytest -x, in that order, the copy first on the path), stopping at the first failure.

A mutation counts as caught only when a test fails on one of the suite's own checks (an assert, a
pytest.raises that did not raise): a parity or value check noticed the bug. A failure by an
exception from inside the library (a crash, a hang) proves nothing about the checks, so it is
reported as CRASH, not as caught; a mutation every test passes is MISSED: a hole in the suite.
The exit status is 0 only when every mutation is caught.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ["minititan", "tests", "configs", "pyproject.toml"]
TIMEOUT_S = 900


@dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # what the mutant gets wrong, in words
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids, the expected catcher first


def mutation(name: str, bug: str, edits: list[tuple[str, str, str]], tests: list[str]) -> Mutation:
    return Mutation(name, bug, tuple(Edit(*e) for e in edits), tuple(tests))


FSDP = "minititan/collectives/fsdp.py"
RING = "minititan/collectives/ring_attention.py"
LAYOUTS = "tests/test_layouts.py::test_layout_matches_one_process"
FSDP_TRAINING = "tests/test_fsdp_training.py::test_layout_matches_one_process"
PIPELINE_PP2 = "tests/test_pipeline_training.py::test_every_schedule_at_pp_2_validation_and_resume_at_pp_1"
MOE_TWO_RANKS = "tests/test_moe_training.py::test_two_rank_layouts"
RING_ATTENTION = "tests/test_ring_attention.py::test_context_parallel_matches_single_process"

MUTATIONS = [
    # ---------------------------------------------------------------- FSDP / HSDP
    mutation("fsdp_reduce_scatter_mean",
             "FSDP's reduce-scatter divides by the shard group size (a mean, where the loss scale already divides)",
             [(FSDP, "        work.wait()\n        del flat\n",
               "        work.wait()\n        out /= dist.get_world_size(self.shard_group)\n        del flat\n")],
             [f"{FSDP_TRAINING}[dp_shard2]", "tests/test_fsdp.py::test_matches_single_process"]),
    mutation("hsdp_replicas_averaged",
             "HSDP averages the replicas' gradients instead of summing them",
             [(FSDP, "            yield\n            work.wait()\n        shard = self.shards[unit]",
               "            yield\n            work.wait()\n"
               "            out /= dist.get_world_size(self.replicate_group)\n        shard = self.shards[unit]")],
             [f"{FSDP_TRAINING}[hsdp2x2]"]),
    mutation("fsdp_prefetch_wrong_unit",
             "FSDP's forward prefetch gathers the unit after the next one (the next unit is gathered late)",
             [(FSDP, "self._start_all_gather(self.order[i + 1])",
               "self._start_all_gather(self.order[min(i + 2, len(self.order) - 1)])")],
             ["tests/test_fsdp.py::test_resharding_checkpoint_ranges_and_errors"]),
    mutation("fsdp_backward_prefetch_wrong_direction",
             "FSDP's backward prefetches the units after this one (already done) instead of the one before",
             [(FSDP, "for earlier in reversed(self.order[:self._position[unit]]):",
               "for earlier in self.order[self._position[unit] + 1:]:")],
             ["tests/test_fsdp.py::test_resharding_checkpoint_ranges_and_errors"]),
    mutation("fsdp_accumulated_grads_dropped",
             "FSDP with fsdp_reduce_every_microbatch = false drops the earlier micro-batches' gradients",
             [(FSDP, "            flat += self._unreduced.pop(unit)", "            self._unreduced.pop(unit)")],
             [f"{FSDP_TRAINING}[no_reshard_reduce_last]"]),
    # ---------------------------------------------------------------- data parallel, the step
    mutation("dp_overlapping_rows",
             "data-parallel ranks read overlapping rows of the global batch",
             [("minititan/core/data.py", "    return slice(data_rank * n, (data_rank + 1) * n)",
               "    return slice(data_rank, data_rank + n)")],
             ["tests/test_train.py::test_dp_replicate_matches_one_process[2]"]),
    mutation("ddp_reduces_the_first_microbatch",
             "DDP starts its bucket all-reduces in the first micro-batch's backward, not the last's (the "
             "values stay right: finish() reduces the buckets again; one extra all-reduce of every gradient)",
             [("minititan/layout/microbatches.py", "        if backward and i == n_micro - 1:",
               "        if backward and i == 0:")],
             ["tests/test_train.py::test_dp_replicate_matches_one_process[2]",
              "tests/test_debugging.py::test_comm_trace_dp_replicate"]),
    mutation("loss_scaled_by_local_tokens",
             "each rank scales its loss by its own tokens (the logged loss averaged back): gradients x data ranks",
             [("minititan/layout/parallelize.py", "loss_scale=1.0 / (t.global_batch_size * t.seq_len),",
               "loss_scale=1.0 / (t.global_batch_size // mesh.size(\"dp_replicate\", \"dp_shard\") * t.seq_len),"),
              ("minititan/train.py", "    return loss.item()\n", "    return loss.item() / layout.facts.data_size\n")],
             ["tests/test_train.py::test_dp_replicate_matches_one_process[2]"]),
    mutation("grad_clip_one_rank_norm",
             "the clipping norm is this rank's own, not summed over the ranks",
             [("minititan/core/guard.py", "        norm = both[0].sqrt()", "        norm = sq_norm.float().sqrt()")],
             [f"{FSDP_TRAINING}[dp_shard2]"]),
    mutation("adamw_bias_correction_off_by_one",
             "AdamW's bias correction counts one step too many",
             [("minititan/core/optim.py", "[self._step_on_device] * len(p)", "[self._step_on_device + 1] * len(p)")],
             ["tests/test_data_optim.py::test_adamw_clips_like_torch_clip_grad_norm"]),
    mutation("lr_warmup_one_step_late",
             "the warmup starts one step late (lr 0 at step 1)",
             [("minititan/core/optim.py", "        return base_lr * step / max(cfg.warmup_steps, 1)",
               "        return base_lr * (step - 1) / max(cfg.warmup_steps, 1)")],
             ["tests/test_data_optim.py::test_lr_schedule"]),
    # ---------------------------------------------------------------- checkpoints
    mutation("resume_without_optimizer_moments",
             "resume restores the parameters but not AdamW's moments",
             [("minititan/train.py", "view.copy_(c.read(f\"optim.{kind}.{name}\", s))", "view.zero_()")],
             ["tests/test_train.py::test_resume_is_bitwise"]),
    mutation("tp_checkpoint_slice_wrong_offset",
             "checkpoint chunks of a tp slice are written at the mirrored offset (rank r's at tp-1-r's place)",
             [("minititan/layout/data_parallel.py",
               "slices = {name: Slice(shape=list(shapes[name]), box=box, owner=owners[name])",
               "slices = {name: Slice(shape=list(shapes[name]), box=[[s - b, s - a] for (a, b), s in "
               "zip(box, shapes[name])], owner=owners[name])")],
             ["tests/test_layouts.py::test_tp_2"]),
    # ---------------------------------------------------------------- tensor parallel, sequence parallel, async TP
    mutation("tp_entry_backward_without_all_reduce",
             "TP: the entry of the column-parallel matmuls (Megatron's f) skips its backward all-reduce",
             [("minititan/collectives/tensor_parallel.py",
               "        return _all_reduce(grad, ctx.group), None\n\n\nclass _ReduceFromTP",
               "        return grad, None\n\n\nclass _ReduceFromTP")],
             ["tests/test_layouts.py::test_tp_2"]),
    mutation("tp_replicated_tensors_counted_per_tp_rank",
             "tensors tp does not split (the norms) are owned by every tp rank: counted tp times in the grad norm",
             [("minititan/layout/contract.py", "    if model.tp_shard_dim(name) is None:\n        replicated_over",
               "    if False:\n        replicated_over")],
             ["tests/test_layouts.py::test_tp_2"]),
    mutation("sp_gather_wrong_dim",
             "sequence parallel's all-gather interleaves the shards along the sequence instead of concatenating them",
             [("minititan/collectives/sequence_parallel.py", "return stacked.movedim(0, 1).flatten(1, 2)",
               "return stacked.movedim(0, 2).flatten(1, 2)")],
             [f"{LAYOUTS}[tp2_sp]"]),
    mutation("sp_norm_grads_not_summed",
             "sequence parallel: the norms' gradients are not summed over tp",
             [("minititan/layout/tensor_parallel.py",
               "        layout.finish_grads.append(functools.partial(sum_replicated_grads, storage, group))",
               "        pass")],
             [f"{LAYOUTS}[tp2_sp]"]),
    mutation("async_tp_drops_gathered_input_grad",
             "async TP: the gradient of the gathered input from the region's other matmuls is dropped",
             [("minititan/collectives/async_tp.py", "            if gx_parts is not None:\n",
               "            if False:\n")],
             ["tests/test_tensor_parallel.py::test_matches_single_process", f"{LAYOUTS}[tp2_sp_async]"]),
    # ---------------------------------------------------------------- context parallel
    mutation("ring_chunk_order_swapped",
             "CP: a rank's two load-balanced chunks in swapped order (tail chunk first)",
             [(RING, "    return cp_rank, 2 * cp_size - 1 - cp_rank", "    return 2 * cp_size - 1 - cp_rank, cp_rank")],
             [RING_ATTENTION, f"{LAYOUTS}[cp2]"]),
    mutation("ring_causal_mask_off_by_one_chunk",
             "ring attention: the visiting shard of the previous rank is masked as if it came after",
             [(RING, "    if source < rank:\n", "    if source < rank - 1:\n")],
             [RING_ATTENTION, f"{LAYOUTS}[cp2]"]),
    mutation("cp_without_kv_head_grouping",
             "CP: K/V heads repeated as a block (query head i reads kv head i % kv_heads), not grouped",
             [(RING, "x.repeat_interleave(rep, dim=1)", "x.repeat(1, rep, 1, 1)")],
             [RING_ATTENTION, f"{LAYOUTS}[cp2]"]),
    mutation("cp_positions_of_rank_0",
             "CP: every rank's RoPE positions are rank 0's",
             [("minititan/layout/context_parallel.py", "shard_positions(seq_len, cp_rank, cp, device)",
               "shard_positions(seq_len, 0, cp, device)")],
             ["tests/test_layouts.py::test_cp_ranks_get_their_tokens_with_their_positions", f"{LAYOUTS}[cp2]"]),
    mutation("cp_allgather_kv_grads_to_wrong_rank",
             "CP all-gather: each rank receives another rank's K/V gradient in the reduce-scatter",
             [(RING, "shard_sequence(dkv, r, size, dim=3) for r in range(size)",
               "shard_sequence(dkv, r, size, dim=3) for r in reversed(range(size))")],
             [RING_ATTENTION, f"{LAYOUTS}[dp2_cp2_allgather]"]),
    mutation("cp_document_mask_of_own_tokens",
             "CP with document masking: ring attention masks each visiting K/V block with this rank's own "
             "document indices, not the visitor's",
             [(RING, "ring_block(rank, (rank - step) % size, half)\n"
                     "            block_out, block_lse, rng = block_attention(\n"
                     "                rows(q, q_part), rows(kv[0], kv_part), rows(kv[1], kv_part), causal,\n"
                     "                allowed_keys(part(docs, q_part), part(kv_docs, kv_part)))",
               "ring_block(rank, (rank - step) % size, half)\n"
               "            block_out, block_lse, rng = block_attention(\n"
               "                rows(q, q_part), rows(kv[0], kv_part), rows(kv[1], kv_part), causal,\n"
               "                allowed_keys(part(docs, q_part), part(docs, kv_part)))")],
             ["tests/test_document_masking.py::test_ring_attention_respects_document_boundaries",
              "tests/test_document_masking.py::test_document_masked_training_matches_one_process_under_cp_tp_pp"]),
    # ---------------------------------------------------------------- pipeline parallel
    mutation("pp_microbatches_swapped",
             "PP: the activations of microbatches 0 and 1 (2 and 3, ...) swapped between stages",
             [("minititan/schedules/runtime.py", "        y = self.stages[s](x, mb)\n",
               "        y = self.stages[s](x, mb if s == 0 else mb ^ 1)\n")],
             [PIPELINE_PP2]),
    mutation("zero_bubble_last_w_dropped",
             "zero bubble: the weight-gradient step (W) of the last microbatch is dropped",
             [("minititan/schedules/schedule.py", "[Action(W, r, i) for i in range(max(m - r, 0), m)]",
               "[Action(W, r, i) for i in range(max(m - r, 0), m - 1)]")],
             ["tests/test_schedules.py::test_every_microbatch_goes_forward_and_backward_once_per_stage", PIPELINE_PP2]),
    mutation("interleaved_stages_assigned_contiguously",
             "interleaved 1F1B: a rank's virtual stages are consecutive (r*v + c) instead of round-robin (c*pp + r)",
             [("minititan/schedules/schedule.py", "return [chunk * pp_size + pp_rank for chunk in range(n_virtual)]",
               "return [pp_rank * n_virtual + chunk for chunk in range(n_virtual)]")],
             ["tests/test_schedules.py::test_every_microbatch_goes_forward_and_backward_once_per_stage", PIPELINE_PP2]),
    mutation("pp_loss_group_without_pp",
             "PP: the logged loss is summed over the data ranks only (the first stage's zero counts)",
             [("minititan/layout/parallelize.py",
               "loss_group = mesh.group(\"pp\", *DATA_DIMS) if mesh.size(\"pp\") > 1 else mesh.group(*DATA_DIMS)",
               "loss_group = mesh.group(*DATA_DIMS)")],
             [PIPELINE_PP2]),
    # ---------------------------------------------------------------- MoE, expert parallel
    mutation("ep_rows_not_regrouped_by_expert",
             "EP: received rows left in (source rank, expert) order: the transpose to (expert, source) skipped",
             [("minititan/collectives/expert_parallel.py",
               "to_expert_order = ((block % per_rank) * ep + block // per_rank).argsort(stable=True)",
               "to_expert_order = block.argsort(stable=True)")],
             ["tests/test_moe.py::test_expert_parallel_matches_single_process", MOE_TWO_RANKS]),
    mutation("moe_bias_update_applied_twice",
             "the aux-loss-free expert-bias update is applied twice per step",
             [("minititan/core/moe.py", "            bias += (step - step.mean()).to(bias.dtype)\n",
               "            bias += (step - step.mean()).to(bias.dtype)\n"
               "            bias += (step - step.mean()).to(bias.dtype)\n")],
             ["tests/test_moe.py::test_update_expert_bias"]),
    mutation("moe_loads_not_summed_over_tp_under_sp",
             "MoE under sequence parallel: the expert loads (the bias update's input) are not summed over tp",
             [("minititan/layout/moe.py", "bias_dims = DATA_DIMS + ((\"tp\",) if facts.sequence_parallel else ())",
               "bias_dims = DATA_DIMS")],
             [MOE_TWO_RANKS]),
    mutation("moe_expert_grads_skip_dp_replicate_under_sp",
             "EP under sequence parallel: whole experts' grads summed over tp only, not dp_replicate x tp",
             [("minititan/layout/moe.py", "dims = (\"dp_replicate\", \"tp\") if facts.sequence_parallel else",
               "dims = (\"tp\",) if facts.sequence_parallel else")],
             ["tests/test_moe_training.py::test_expert_fsdp_compositions"]),
    # ---------------------------------------------------------------- Float8
    mutation("float8_scale_inverted_on_one_operand",
             "Float8: the first operand's scale is not inverted when the GEMM undoes it",
             [("minititan/core/float8.py", "a_inv, bt_inv = a_scale.reciprocal(), bt_scale.reciprocal()",
               "a_inv, bt_inv = a_scale, bt_scale.reciprocal()")],
             ["tests/test_float8.py::test_linear_forward_and_grads_close_to_high_precision"]),
    # ---------------------------------------------------------------- document masking, mixed precision
    mutation("block_mask_full_tile_across_a_boundary",
             "document BlockMask: a kv tile counts as full (no mask) when it ends in the document the query "
             "tile ends in, so tokens see across a document boundary",
             [("minititan/core/document_attention.py",
               "full = (k < q) & (first[:, None, :] == last[:, :, None])",
               "full = (k < q) & (last[:, None, :] == last[:, :, None])")],
             ["tests/test_document_masking.py::test_the_block_mask_is_the_one_create_block_mask_builds"]),
    mutation("embedding_rows_not_cast",
             "bf16 training: the embedding's rows come out in fp32 (the lookup on the master is not cast), so "
             "the whole network runs in fp32",
             [("minititan/core/mixed_precision.py", "return F.embedding(tokens, w).to(dtype)",
               "return F.embedding(tokens, w)")],
             ["tests/test_mixed_precision.py::test_embedding_on_an_fp32_master_equals_the_cast_tables_lookup"]),
    mutation("step_casts_kept_after_the_update",
             "bf16 training: a step's shared casts are reused after the optimizer has updated the masters (the "
             "next step's forward runs on the old weights)",
             [("minititan/core/mixed_precision.py", "if held is not master or version != master._version:",
               "if held is not master:")],
             ["tests/test_mixed_precision.py::test_a_shared_cast_is_remade_when_its_master_changes"]),
    mutation("step_casts_overwrite_the_gradient",
             "bf16 training: each micro-batch's gradient of a shared cast replaces the master's instead of adding "
             "to it (only the last micro-batch counts)",
             [("minititan/core/mixed_precision.py", "    if master.grad is None:\n        master.grad = copy.grad.to",
               "    if True:\n        master.grad = copy.grad.to")],
             ["tests/test_mixed_precision.py::test_a_steps_micro_batches_share_one_cast_and_the_same_gradients"]),
    mutation("moe_gap_rows_get_a_gradient",
             "the grouped experts' backward gathers every buffer row's gradient from a pair, the gap rows (which "
             "no pair picks, and which read token 0) included: their gradient flows into the expert weights",
             [("minititan/core/moe.py", ".masked_fill_(gap, 0), None", ", None")],
             ["tests/test_moe.py::test_grouped_mm_matches_loop_with_empty_experts"]),
    mutation("step_casts_skip_the_masters_hooks",
             "bf16 under data parallel: a shared cast's hook adds into its master's gradient without running the "
             "master's own hooks, so the buckets holding it are all-reduced after the backward, not overlapped with "
             "it (the values stay right: finish() launches them)",
             [("minititan/core/mixed_precision.py",
               "    for hook in (master._post_accumulate_grad_hooks or {}).values():\n        hook(master)\n", "")],
             ["tests/test_mixed_precision.py::test_shared_casts_under_a_replica_all_reduce_keep_it_inside_the_last_"
              "backward[dense_dp_replicate2]"]),
    mutation("selective_ac_keeps_the_weight_casts",
             "compiled selective AC keeps the casts' outputs (a bf16 copy of every block's weights held from forward "
             "to backward) instead of recomputing them",
             [("minititan/core/activation_checkpoint.py", "    torch.ops.aten.amax.default,\n}",
               "    torch.ops.aten.amax.default,\n    torch.ops.aten._to_copy.default,\n}")],
             ["tests/test_activation_checkpoint.py::test_compiled_selective_recomputes_the_weight_casts"]),
    mutation("selective_ac_keeps_the_query_projection",
             "selective-op AC keeps every matmul's output, the query projection's too (one [tokens, dim] tensor per "
             "layer more held from forward to backward)",
             [("minititan/core/activation_checkpoint.py", "        if recompute_query and op in _LINEARS:",
               "        if False:")],
             ["tests/test_activation_checkpoint.py::test_selective_recomputes_the_query_projection"]),
    mutation("selective_attention_keeps_nothing",
             'selective = "attention" saves nothing (plain full AC): the attention forward runs again in backward',
             [("minititan/core/activation_checkpoint.py",
               "    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION else CheckpointPolicy.PREFER_RECOMPUTE",
               "    return CheckpointPolicy.PREFER_RECOMPUTE")],
             ["tests/test_activation_checkpoint.py::test_selective_attention_keeps_only_the_attention_output"]),
    mutation("graph_breaking_blocks_compiled_inside_checkpoint",
             "a block that breaks dynamo's graph is compiled with its checkpoint inside (compile(checkpoint(block))) "
             "under full AC: dynamo runs it whole eagerly",
             [("minititan/layout/parallelize.py", "    return frozenset(names)\n", "    return frozenset()\n")],
             ["tests/test_compile.py::test_blocks_that_break_the_graph_compile_in_pieces_under_full_checkpointing"]),
    # ---------------------------------------------------------------- the plan
    mutation("plan_stand_in_drops_the_subclass",
             "minititan plan: the compile stand-in traces on plain tensors, so the Float8 loss takes the fp8 branch "
             "for the output projection the filter keeps in bf16",
             [("minititan/plan/compiled.py", "    if is_traceable_wrapper_subclass(t):", "    if False:")],
             ["tests/test_plan.py::test_a_compiled_float8_dry_run_keeps_the_filtered_output_projection_in_bf16"]),
    mutation("plan_traced_collectives_unrecorded",
             "minititan plan: a traced graph's collectives run outside the dry run's recorder, so a compiled "
             "expert-parallel step prices no all-to-all",
             [("minititan/plan/compiled.py", "    with recorder:\n        if func is c10d.all_to_all_single.default:",
               "    with contextlib.nullcontext():\n        if func is c10d.all_to_all_single.default:")],
             ["tests/test_plan.py::test_a_compiled_dry_run_prices_expert_parallel_as_dynamo_compiles_it"]),
    mutation("plan_traces_a_host_read_inside_checkpoint",
             "minititan plan: the compile stand-in traces past a host read inside activation checkpointing, "
             "pricing compiled an MoE block that the real step runs eagerly",
             [("minititan/plan/compiled.py", "        if checkpointed:\n            raise GraphBreak",
               "        if False:\n            raise GraphBreak")],
             ["tests/test_plan.py::test_a_compiled_dry_run_prices_expert_parallel_as_dynamo_compiles_it"]),
]


# ---------------------------------------------------------------- applying one


class PatternError(Exception):
    """A mutation's text no longer occurs exactly once: the code moved; update the mutation."""


def copy_repository(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)


def patched(text: str, edit: Edit, mutation_name: str) -> str:
    count = text.count(edit.old)
    if count != 1:
        raise PatternError(f"{mutation_name}: {edit.file}: the text to replace occurs {count} times, not once: "
                           f"{edit.old!r}")
    return text.replace(edit.old, edit.new)


def patched_file(root: Path, edit: Edit, mutation_name: str) -> str:
    """The text of root/edit.file with the edit applied (nothing is written)."""
    path = root / edit.file
    if not path.is_file():
        raise PatternError(f"{mutation_name}: {edit.file} does not exist")
    return patched(path.read_text(), edit, mutation_name)


def apply(m: Mutation, tree: Path) -> list[str]:
    """Patch the copy; returns the modules the mutation changed."""
    modules = []
    for edit in m.edits:
        path = tree / edit.file
        text = patched_file(tree, edit, m.name)
        compile(text, str(path), "exec")  # a mutation must be a bug that runs, never a syntax error
        path.write_text(text)
        modules.append(edit.file.removesuffix(".py").replace("/", "."))
    return modules


def environment(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}


def imports_from_copy(tree: Path, modules: list[str]) -> str | None:
    """None if the patched modules import, from the copy; else what went wrong."""
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import minititan; print(minititan.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tree, env=environment(tree), capture_output=True, text=True)
    if r.returncode:
        return f"the mutant does not import: {r.stderr.strip().splitlines()[-1]}"
    if not r.stdout.strip().startswith(str(tree)):
        return f"minititan imports from {r.stdout.strip()}, not from the copy {tree}"
    return None


@dataclass
class Outcome:
    status: str  # CAUGHT, CRASH, MISSED, BROKEN
    test: str = ""  # the first failing test
    seconds: float = 0.0
    detail: str = ""


CHECKS = ("AssertionError", "Failed")  # an assert; a pytest.raises that did not raise (pytest.fail)


def first_failure(report: Path) -> tuple[str, str, bool] | None:
    """(test id, failure message, whether it failed on a check of the suite) of the first failed
    test in a junit report; None if none failed. A check of the suite: the traceback ends in a file
    of tests/ with an AssertionError or pytest's Failed, not with an exception from the library."""
    if not report.is_file():
        return None
    for case in ET.parse(report).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                path = case.get("classname", "").replace(".", "/") + ".py"
                lines = (node.text or "").strip().splitlines()
                where = re.fullmatch(r"(.+?):\d+: (\w+)", lines[-1]) if lines else None  # tests/x.py:12: Error
                check = tag == "failure" and bool(where) and where[1].startswith("tests/") and where[2] in CHECKS
                return f"{path}::{case.get('name')}", (node.get("message") or "").strip(), check
    return None


def run_tests(tree: Path, tests: tuple[str, ...]) -> Outcome:
    report = tree / "report.xml"
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               f"--junitxml={report}", *tests]
    start = time.perf_counter()
    try:
        r = subprocess.run(command, cwd=tree, env=environment(tree), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Outcome("CRASH", seconds=time.perf_counter() - start, detail=f"timed out after {TIMEOUT_S} s")
    seconds = time.perf_counter() - start
    failed = first_failure(report)
    if r.returncode == 0:
        return Outcome("MISSED", seconds=seconds, detail="every test passed")
    if r.returncode in (4, 5):  # a usage error, or no test collected: a node id that no longer exists
        lines = (r.stdout + r.stderr).strip().splitlines()
        return Outcome("BROKEN", seconds=seconds, detail=f"pytest exit {r.returncode}: {lines[-1] if lines else ''}")
    if failed is None:
        lines = (r.stdout + r.stderr).strip().splitlines()
        return Outcome("CRASH", seconds=seconds, detail=f"pytest exit {r.returncode}: {lines[-1] if lines else ''}")
    test, message, check = failed
    first_line = message.splitlines()[0] if message else ""
    return Outcome("CAUGHT" if check else "CRASH", test, seconds, first_line[:160])


def run_mutation(m: Mutation, baseline: bool = False) -> Outcome:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        tree = Path(tmp)
        copy_repository(tree)
        try:
            modules = [] if baseline else apply(m, tree)
        except (PatternError, SyntaxError) as e:
            return Outcome("BROKEN", detail=str(e))
        problem = imports_from_copy(tree, modules)
        if problem:
            return Outcome("BROKEN", detail=problem)
        return run_tests(tree, m.tests)


# ---------------------------------------------------------------- the table


def table(rows: list[tuple[Mutation, Outcome]]) -> str:
    lines = ["| mutation | the bug | caught by | seconds | result |", "|---|---|---|---|---|"]
    for m, o in rows:
        lines.append(f"| `{m.name}` | {m.bug} | `{o.test or '-'}` | {o.seconds:.0f} | {o.status}: "
                     f"{o.detail.replace('|', '/')} |")
    return "\n".join(lines)


def check_patterns(mutations: list[Mutation]) -> list[str]:
    """Every pattern against the real files (read only): the problems, none if all match once."""
    problems = []
    for m in mutations:
        for edit in m.edits:
            try:
                patched_file(ROOT, edit, m.name)
            except PatternError as e:
                problems.append(str(e))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", action="append", default=[],
                        help="only mutations whose name contains this (repeat for several)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--check", action="store_true", help="only check that every pattern matches once")
    parser.add_argument("--baseline", action="store_true", help="run each mutation's tests on the unmutated copy")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.select or any(k in m.name for k in args.select)]
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.bug}\n    " + "\n    ".join(m.tests))
        return 0
    problems = check_patterns(mutations)
    for p in problems:
        print(f"PATTERN: {p}", file=sys.stderr)
    if args.check or problems:
        print(f"{len(mutations) - len({p.split(':')[0] for p in problems})} of {len(mutations)} mutations match")
        return 1 if problems else 0
    if args.baseline:
        failed = []
        for test in dict.fromkeys(t for m in mutations for t in m.tests):
            o = run_mutation(Mutation("baseline", "", (), (test,)), baseline=True)
            passed = o.status == "MISSED"  # what a mutation's outcome would be: every test passed
            print(f"{'passes' if passed else 'FAILS '} {o.seconds:5.0f} s  {test}  {'' if passed else o.detail}",
                  flush=True)
            failed += [] if passed else [test]
        return 1 if failed else 0
    rows = []
    for m in mutations:
        o = run_mutation(m)
        rows.append((m, o))
        print(f"{o.status:6} {o.seconds:5.0f} s  {m.name}  {o.test}  {o.detail}", flush=True)
    out = table(rows)
    print(out)
    if args.markdown:
        args.markdown.write_text(out + "\n")
    caught = sum(o.status == "CAUGHT" for _, o in rows)
    print(f"{caught} of {len(rows)} mutations caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
