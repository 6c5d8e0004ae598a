"""FSDP's fp8 all-gather (float8.fsdp_all_gather): the gathered bytes are the linear's own fp8 cast
of the whole weight, so outputs and gradients equal those of the param_dtype all-gather bit for
bit; the trainer at dp_shard 2 reproduces dp_shard 1's fp8 losses; the fp8 weights' all-gathers
move half the bytes of bf16; precompute_scale takes one all-reduce per step; a filter naming weights
inside a block keeps them in high precision through activation checkpointing's recompute."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minititan.collectives.comm_trace import CommTracer, group_names
from minititan.collectives.fsdp import FSDP
from minititan.collectives.fsdp_float8 import Float8Weight, enable_float8_all_gather
from minititan.collectives.mesh import Mesh, resolve_degrees
from minititan.core import model
from minititan.core.config import ConfigError, load_config
from minititan.core.float8 import E4M3, Float8Matmul, float8_linear, quantize
from minititan.layout import parallelize
from tests.distributed import run_ranks
from tests.harness import TINY, assert_same_losses, train_run, train_runs

FP8 = ["float8.enable=true"]
FP8_ALL_GATHER = FP8 + ["float8.fsdp_all_gather=true"]


@pytest.mark.parametrize("overrides, words", [
    (["float8.fsdp_all_gather=true"], ["float8.enable"]),
    (FP8_ALL_GATHER + ["float8.recipe=rowwise"], ["tensorwise"]),
    (FP8 + ["float8.precompute_scale=true"], ["float8.fsdp_all_gather"]),
])
def test_config_refuses_what_the_fp8_all_gather_cannot_do(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert all(w in str(e.value) for w in words)


def test_float8_weight_acts_as_its_dequantized_weight():
    w = torch.randn(32, 48) * 0.1
    data, scale = quantize(w, E4M3, rowwise=False)
    fw = Float8Weight(data, scale, torch.float32).requires_grad_()
    x = torch.randn(5, 48)  # 5 tokens: not a multiple of 16, so float8_linear runs F.linear
    float8_linear(x, fw).sum().backward()
    dequantized = (data.float() / scale).requires_grad_()
    F.linear(x, dequantized).sum().backward()
    assert torch.equal(float8_linear(x, fw), F.linear(x, dequantized.detach()))
    assert type(fw.grad) is torch.Tensor and torch.equal(fw.grad, dequantized.grad)
    assert fw.detach().fp8_data is data  # activation checkpointing detaches its inputs
    with pytest.raises(ValueError, match="tensorwise"):
        float8_linear(torch.randn(16, 48), fw, "rowwise")


# ---------------------------------------------------------------- FSDP on its own

# 2 ranks hold [0, 2344) and [2344, 4688) of unit "a"'s flat buffer (w1 | norm | w2 | n2): the norm
# straddles the boundary, so both ranks send elements of the other params, and unevenly
SHAPES = {"a.w1": (48, 32), "a.norm": (1000,), "a.w2": (32, 48), "a.n2": (600,), "b.w": (16, 32)}
UNITS = {"a": ["a.w1", "a.norm", "a.w2", "a.n2"], "b": ["b.w"]}
FP8_NAMES = ["a.w1", "a.w2", "b.w"]


def _forward_backward(rank, fsdp, full):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank)).bfloat16()
    with fsdp.resharding():
        a = fsdp.gather("a")
        h = float8_linear(x * a["a.norm"][:32], a["a.w1"]) * a["a.n2"][:48]
        y = float8_linear(float8_linear(h, a["a.w2"]), fsdp.gather("b")["b.w"])
    y.float().square().sum().backward()
    fsdp.finish_grad_sync()
    return a, y.detach(), {unit: shard.grad for unit, shard in fsdp.shards.items()}


def _fsdp_fp8_gather(rank, world):
    g = torch.Generator().manual_seed(0)
    full = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    runs = []
    for fp8 in (False, True):
        fsdp = FSDP(SHAPES, UNITS, dist.group.WORLD, param_dtype=torch.bfloat16)
        fsdp.load_full(full)
        if fp8:
            fp8_gather = enable_float8_all_gather(fsdp, FP8_NAMES)
        runs.append(_forward_backward(rank, fsdp, full))
    params, _, _ = runs[1]
    for name in ("a.w1", "a.w2"):  # the gathered bytes and scale: the linear's own cast of the whole weight
        data, scale = quantize(full[name].bfloat16(), E4M3, rowwise=False)
        assert isinstance(params[name], Float8Weight)
        assert torch.equal(params[name].fp8_data.view(torch.uint8), data.view(torch.uint8))
        assert torch.equal(params[name].fp8_scale, scale)
    for name in ("a.norm", "a.n2"):
        assert torch.equal(params[name], full[name].bfloat16())
    # finish_grad_sync forgot the scales; precompute_scales finds the same ones, for every unit at once
    assert fp8_gather.scales == {}
    fp8_gather.precompute_scales(fsdp.shards)
    assert torch.equal(fp8_gather.scales["a"], torch.stack([params["a.w1"].fp8_scale, params["a.w2"].fp8_scale]))
    return [(y, grads) for _, y, grads in runs]


def test_fp8_all_gather_gives_the_bf16_all_gathers_outputs_and_grads():
    for (y, grads), (y_fp8, grads_fp8) in run_ranks(2, _fsdp_fp8_gather):
        assert torch.equal(y_fp8, y)
        assert all(torch.equal(grads_fp8[unit], grads[unit]) for unit in grads)


# ---------------------------------------------------------------- through the trainer


@pytest.fixture(scope="module")
def fp8_dp_shard_1(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("fp8_ref"), 1, FP8)


@pytest.mark.parametrize("overrides", [
    FP8_ALL_GATHER + ["float8.precompute_scale=true", "activation_checkpoint.mode=full"],
    FP8 + ["float8.force_recompute_weight_in_bwd=true"],
], ids=["fp8_all_gather_precompute_ac_full", "bf16_all_gather_recompute_weight"])
def test_dp_shard_2_matches_dp_shard_1_in_fp8(tmp_path, fp8_dp_shard_1, overrides):
    rows, _ = train_run(tmp_path, 2, overrides + ["parallelism.dp_shard=2"])
    assert_same_losses(rows, fp8_dp_shard_1[0], rtol=1e-3)


def _traced_step(rank, world):
    """One forward + backward of the tiny model at dp_shard 2 in bf16, with the param_dtype
    all-gather and with the fp8 one (+ precompute_scale): every collective call, in order."""
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(rank))
    calls = []
    for fp8 in (False, True):
        cfg = load_config(None, TINY + FP8 + ["parallelism.dp_shard=2", "training.param_dtype=bfloat16",
                                              f"float8.fsdp_all_gather={fp8}", f"float8.precompute_scale={fp8}"])
        mesh = Mesh(resolve_degrees(world, dp_shard=world), rank)
        layout = parallelize.build(cfg, mesh, torch.device("cpu"))
        tracer = CommTracer(group_names(mesh.groups, mesh.sizes))
        for update in layout.after_optimizer_step:
            update()
        with layout.forward_context():
            loss = model.loss_sum(layout.params, tokens[:, :-1], tokens[:, 1:], cfg.model, layout.ops)
        loss.backward()
        for finish in layout.finish_grads:
            finish()
        tracer.close()
        calls.append([(r.op, r.dtype, r.bytes) for r in tracer.last_step])
    return calls


def test_fp8_weights_all_gather_half_the_bytes_of_bf16():
    bf16_calls, fp8_calls = run_ranks(2, _traced_step)[0]
    dim, world = 64, 2
    bf16_gathers = [(dtype, n) for op, dtype, n in bf16_calls if op == "all_gather"]
    fp8_gathers = iter([(dtype, n) for op, dtype, n in fp8_calls if op == "all_gather"])
    halved, bf16_bytes, fp8_bytes = 0, 0, 0
    for dtype, n in bf16_gathers:  # the same gathers in the same order (forward, then backward's re-gathers)
        assert dtype == "bfloat16"
        got_dtype, got = next(fp8_gathers)
        if got_dtype == "uint8":  # a unit with fp8 weights: 1 byte a weight, then its norm in bf16
            norm_dtype, norm_bytes = next(fp8_gathers)
            assert 2 * got == n and norm_dtype == "bfloat16" and norm_bytes <= world * dim * 2
            halved, bf16_bytes, fp8_bytes = halved + 1, bf16_bytes + n, fp8_bytes + got + norm_bytes
        else:  # the embedding and the output head (filtered) are gathered as before
            assert (got_dtype, got) == (dtype, n)
    assert next(fp8_gathers, None) is None
    assert halved == 2 * 2 * 2  # 2 layers x (attention, feed-forward) x (forward, backward re-gather)
    assert fp8_bytes < 0.51 * bf16_bytes
    # scales: the baseline all-reduces nothing; precompute_scale all-reduces once (after the optimizer step)
    assert [c for c in bf16_calls if c[0] == "all_reduce"] == []
    n_fp8_weights = 7 * 2  # wq, wk, wv, wo, w1, w2, w3 of 2 layers
    assert [c for c in fp8_calls if c[0] == "all_reduce"] == [("all_reduce", "float32", 4 * n_fp8_weights)]


# ---------------------------------------------------------------- float8.filter naming weights inside a block

# "wo" in every layer, wq in layer 1 only: the blocks' function is shared, only the name tells them apart
IN_BLOCK_FILTER = FP8 + ['float8.filter=["output", "wo", "layers.1.attention.wq"]']
HIGH_PRECISION = {"layers.0.attention": [False, False, False, True], "layers.0.feed_forward": [False] * 3,
                  "layers.1.attention": [True, False, False, True], "layers.1.feed_forward": [False] * 3}


def _linears_of_a_step(rank, world, ac_mode, fp8_all_gather):
    """One forward + backward at dp_shard 2 with activation checkpointing: for every ops.linear call
    in order (forward, then backward's recomputes), [whether it ran in high precision (no Float8Matmul),
    the weight's type, the type of the tensor a HighPrecisionWeight wraps]."""
    cfg = load_config(None, TINY + IN_BLOCK_FILTER + ["parallelism.dp_shard=2", f"activation_checkpoint.mode={ac_mode}",
                                                      f"float8.fsdp_all_gather={fp8_all_gather}"])
    layout = parallelize.build(cfg, Mesh(resolve_degrees(world, dp_shard=world), rank), torch.device("cpu"))
    calls, linear, fp8_matmul = [], layout.ops.linear, Float8Matmul.apply

    def recording_linear(x, w):
        # recorded before it runs: a recompute stops inside the block's last linear once it has
        # re-made every tensor backward needs (checkpoint's early stop), so that call never returns
        calls.append([True, type(w).__name__, type(getattr(w, "weight", w)).__name__])
        return linear(x, w)

    def recording_fp8_matmul(*args):
        calls[-1][0] = False
        return fp8_matmul(*args)

    layout.ops.linear = recording_linear  # the blocks get layout.ops: forward and recompute both record
    Float8Matmul.apply = recording_fp8_matmul
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(rank))
    with layout.forward_context():
        loss = model.loss_sum(layout.params, tokens[:, :-1], tokens[:, 1:], cfg.model, layout.ops)
    forward = len(calls)
    loss.backward()
    for finish in layout.finish_grads:
        finish()
    Float8Matmul.apply = fp8_matmul
    return calls[:forward], calls[forward:]


@pytest.mark.parametrize("ac_mode, fp8_all_gather", [("full", False), ("selective", True)])
def test_filtered_weights_in_a_block_run_in_high_precision_through_the_recompute(ac_mode, fp8_all_gather):
    forward, recompute = run_ranks(2, _linears_of_a_step, ac_mode, fp8_all_gather)[0]
    blocks = list(HIGH_PRECISION.values())
    assert [hp for hp, _, _ in forward] == sum(blocks, []) + [True]  # + the output head
    assert [hp for hp, _, _ in recompute] == sum(reversed(blocks), [])  # backward recomputes the last block first
    fp8_weight = "Float8Weight" if fp8_all_gather else "Tensor"
    for hp, kind, inner in forward + recompute:  # the fp8 all-gather skips filtered weights: a plain view inside
        assert (kind, inner) == (("HighPrecisionWeight", "Tensor") if hp else (fp8_weight, fp8_weight))


@pytest.fixture(scope="module")
def in_block_filter_dp_shard_1(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("fp8_filter_ref"), 1, IN_BLOCK_FILTER)


def test_in_block_filter_with_activation_checkpointing_matches_dp_shard_1(tmp_path, in_block_filter_dp_shard_1):
    runs = {"ac_full": ["activation_checkpoint.mode=full"],
            "ac_selective": ["activation_checkpoint.mode=selective"],
            "ac_full_fp8_all_gather": ["activation_checkpoint.mode=full", "float8.fsdp_all_gather=true"],
            "ac_selective_fp8_all_gather": ["activation_checkpoint.mode=selective", "float8.fsdp_all_gather=true"]}
    results = train_runs(tmp_path, 2, runs, common=IN_BLOCK_FILTER + ["parallelism.dp_shard=2"])
    for rows, _ in results.values():
        assert_same_losses(rows, in_block_filter_dp_shard_1[0], rtol=1e-3)
