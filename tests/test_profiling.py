"""`logging.profile_step` and the kernel summary (align_cli/profiling.py). The groups are checked on kernel and
operator names taken from real profiles (H200 decode and DPO steps, NCCL, CPU runs); the trainers' profiles in
tests/test_distributed.py (two gloo processes against one) and below."""

import json

import pytest
import torch

from align_cli.profiling import StepProfiler, group_of


@pytest.mark.parametrize("name, group", [
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "communication"),
    ("gloo:all_reduce", "communication"),
    ("c10d::allreduce_", "communication"),
    ("nvjet_sm90_tst_64x8_64x16_2x4_h_bz_bias_TNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false>>", "attention"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("triton_poi_fused__unsafe_view_mul_silu_7", "other"),
    ("aten::mul", "other"),
    ("aten::mm_out_not_a_match_suffix", "other"),
])
def test_kernel_groups(name, group):
    assert group_of(name) == group


def test_step_profiler_summarises_only_its_step():
    """Step 1 of 0..2 is profiled (CPU operators here): its matrix products are counted, and `end` of another
    step returns nothing."""
    profiler = StepProfiler(1)
    a = torch.randn(256, 256)
    for step in range(3):
        profiler.begin(step)
        for _ in range(step + 1):
            a @ a
        assert (profiler.end(step) is not None) == (step == 1)
    summary = profiler.summary
    assert summary["measured"] == "cpu operators' own time"
    assert summary["groups_s"]["matmul"] > 0
    assert sum(t["count"] for t in summary["top"] if t["name"] == "aten::mm") == 2
    json.dumps(summary)  # written as JSON by the trainers


def test_no_step_chosen_profiles_nothing():
    profiler = StepProfiler(None)
    profiler.begin(1)
    assert profiler.end(1) is None and profiler.summary is None


def test_a_profile_step_past_the_last_step_is_refused(tiny_recipe):
    from align_cli.errors import UserError
    from align_cli.recipe import load_recipe

    with pytest.raises(UserError) as error:
        load_recipe(str(tiny_recipe()), ["logging.profile_step=9"])  # the tiny recipe runs 4 steps
    assert "logging.profile_step (9)" in str(error.value) and "training.max_steps (4)" in str(error.value)


def _frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


MODEL = _frame("/site/transformers/models/llama/modeling_llama.py", 150, "forward")
TORCH = _frame("/site/torch/nn/functional.py", 2000, "silu")
KERNEL = _frame("/repo/logprob_kernels/triton_logprobs.py", 140, "backward")


def test_peak_breakdown_charges_what_was_live_at_the_peak():
    """A hand-made trace: 100 bytes before recording; the model allocates 50 then 30, frees the 50, the kernel
    allocates 40 (100 + 30 + 40 = 170, below the 180 reached at the 30), then a block from
    before recording (20 bytes) is freed. The peak is 180 bytes, live then: before 100, model 80 (both blocks)."""
    from align_cli.profiling import BEFORE, peak_breakdown

    events = [
        {"action": "alloc", "addr": 1, "size": 50, "frames": [TORCH, MODEL]},
        {"action": "alloc", "addr": 2, "size": 30, "frames": [MODEL]},
        {"action": "free_requested", "addr": 1, "size": 50},
        {"action": "free_completed", "addr": 1, "size": 50},
        {"action": "alloc", "addr": 3, "size": 40, "frames": [KERNEL]},
        {"action": "free_completed", "addr": 99, "size": 20},
        {"action": "alloc", "addr": 4, "size": 5, "frames": []},
    ]
    result = peak_breakdown(events, allocated_before=100)
    assert result["peak_event"] == 1 and result["peak_bytes"] == 180
    live = {row["where"]: row["bytes"] for row in result["live"]}
    assert live == {BEFORE: 100, "llama/modeling_llama.py:150 forward": 80}  # torch's own frame is skipped
    assert result["reached_by"] == "llama/modeling_llama.py:150 forward"


def test_peak_breakdown_counts_frees_of_earlier_blocks_and_backward_kernels():
    """After an earlier block (60 of the 100 before recording) is freed, later allocations on autograd's thread
    (no Python frame) set a new peak: 40 before + 70 + 50 = 160 > 100."""
    from align_cli.profiling import AUTOGRAD, peak_breakdown

    events = [
        {"action": "free_completed", "addr": 7, "size": 60},
        {"action": "alloc", "addr": 1, "size": 70, "frames": []},
        {"action": "alloc", "addr": 2, "size": 50, "frames": [KERNEL]},
    ]
    result = peak_breakdown(events, allocated_before=100, top=1)
    assert result["peak_event"] == 2
    assert result["peak_bytes"] == 160
    assert [(row["where"], row["bytes"]) for row in result["live"]] == [(AUTOGRAD, 70)]  # the largest; the rest summed
    assert result["rest_bytes"] == 40 + 50
