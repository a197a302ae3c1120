"""bench/bench_gpu.py's CPU path (what CI can run): its results' structure, and variants equal to eager."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_gpu  # noqa: E402

SMALL = ["--device", "cpu", "--config", "tiny", "--sizes", "64", "--frames", "2", "--repeats", "1"]


def test_cpu_path_writes_results_and_variants_match_eager(tmp_path, capsys):
    variants = ["memeff", "sdpa", "memeff+cl", "memeff+ff", "memeff+ff+serial"]
    out = bench_gpu.main(SMALL + ["--dtypes", "float32", "--variants", *variants, "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    rows = out["rows"]
    assert [r["variant"] for r in rows] == variants
    for r in rows:
        assert "error" not in r, r
        assert r["finite"] and r["within_tolerance"], r
        assert r["unet_tflop"] > 0 and r["controlnets_tflop"] > 0 and r["window_s"] > 0
        assert r["peak_gb"] is None  # no accelerator: no max_memory_allocated
        assert r["unet_fraction_of_peak"] is None  # and no peak to compare with
    assert rows[0]["rel_rms_vs_eager"] == 0  # the reference compared with itself
    assert all(r["rel_rms_vs_eager"] < 1e-5 for r in rows)  # attention kernel, channels-last, chunked FF, serial CFG
    # the window's FLOPs do not depend on the variant, and serial CFG does the same work as batched
    assert len({(r["unet_tflop"], r["controlnets_tflop"]) for r in rows}) == 1

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["env"]["config"] == "tiny" and len(saved["rows"]) == len(rows)
    table = (tmp_path / "results.md").read_text()
    assert "| size | dtype | variant | peak GB" in table and "memeff+ff+serial" in table
    assert "| size | dtype | variant | peak GB" in printed and "targets (1536x1536 fp16 window of 16)" in printed


def test_cpu_path_bfloat16_channels_last_within_rounding(tmp_path):
    rows = bench_gpu.main(SMALL + ["--dtypes", "bfloat16", "--variants", "memeff", "memeff+cl", "--out", str(tmp_path)])["rows"]
    assert [r["dtype"] for r in rows] == ["bfloat16", "bfloat16"]
    assert rows[1]["finite"] and rows[1]["rel_rms_vs_eager"] < bench_gpu.TOLERANCE["bfloat16"], rows[1]


def test_ff_variant_chunks_every_feed_forward_with_the_package():
    from diffutoon.memory import ChunkedFeedForward

    unet, nets = bench_gpu.build("tiny", "cpu", torch.float32)
    count = lambda m: sum(isinstance(x, ChunkedFeedForward) for x in m.modules())
    blocks = sum(getattr(x, "ff", None) is not None for x in unet.modules())
    bench_gpu.set_variant(unet, nets, "memeff+ff")
    assert count(unet) == blocks > 0 and count(nets[0]) > 0
    bench_gpu.set_variant(unet, nets, "memeff")
    assert count(unet) == 0


def test_compile_variant_wraps_the_models_it_runs():
    """torch.compile is lazy: this checks the plumbing without compiling (see the slow test for the comparison)."""
    unet, nets = bench_gpu.build("tiny", "cpu", torch.float32)
    run_unet, run_nets, fmt = bench_gpu.set_variant(unet, nets, "memeff+cl+compile")
    assert fmt == torch.channels_last
    assert all(type(m).__name__ == "OptimizedModule" for m in (run_unet, *run_nets))
    assert run_unet._orig_mod is unet and [m._orig_mod for m in run_nets] == nets
    with pytest.raises(ValueError, match="one of sdpa / memeff"):
        bench_gpu.set_variant(unet, nets, "cl")


@pytest.mark.skipif(not os.environ.get("DIFFUTOON_SLOW_TESTS"),
                    reason="torch.compile of the tiny UNet + 2 ControlNets takes ~240 s with inductor (~45 s tracing "
                           "alone) on the 2-core CI CPU; set DIFFUTOON_SLOW_TESTS=1 to run it")
def test_compiled_window_matches_eager(tmp_path):
    out = bench_gpu.main(SMALL + ["--dtypes", "float32", "--variants", "memeff", "memeff+compile", "--out", str(tmp_path)])
    compiled = out["rows"][1]
    assert compiled["within_tolerance"] and compiled["rel_rms_vs_eager"] < 1e-4, compiled


def test_memory_estimate_counts_on_meta():
    out = bench_gpu.main(["--estimate-memory", "--config", "tiny", "--sizes", "64", "--frames", "2"])
    by = {(r["branches"], r["ff"]): r["activations_gb"] for r in out["estimate"]}
    assert by[(1, False)] < by[(2, False)] and by[(2, True)] <= by[(2, False)]
    assert out["weights_gb"] > 0
