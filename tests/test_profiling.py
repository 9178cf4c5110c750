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
