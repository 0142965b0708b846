"""benchmarks/kernel_signals.py: the LLO bundle parser on a hand-written dump (no libtpu), and
one small end-to-end run (JAX's flash kernel and lctx_jax's, T=1024, blocks of 128) compiled
by libtpu for a v5p: positive counts for every kernel, a table with the baseline's rows and
ratios against it. The end-to-end test needs libtpu (the `tpu` extra) and skips without it."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_signals  # noqa: E402

# A grid loop (bundles 1-8) with an init region (3-4: stores, no matmul, beside the matmul
# region) and a block-step region (6-7: a matmul, an add, an exp and a DMA).
DUMP = """\
     0   :  { %1 = smov 0 } /* Start region 1 */
   0x1 LB: > { %2 = sadd.s32 1, %s1_s1 } /* Start region 2 */
   0x2   : > { %3 = sbr.rel (%p1_p1) target = $region3 }
   0x3   : > { %4 = vst [vmem:[#allocation2] sm:$0xff] %v1_v1 /* loc("/k.py":3:1) */ }
   0x4   : > { %5 = vadd.f32 %v1_v1, %v2_v2 /* loc("/k.py":4:1) */ }
   0x5 PF: > { %6 = sbr.rel (%p2_p2) target = $region4 } /* Start/End empty region 3 */
   0x6   : > { %7 = vmatmul.bf16.gmra.mxu0 %v3_v3  ;;  %8 = vadd.f32 %v4_v4, %v5_v5 /* loc("/k.py":9:2) */ }
   0x7   : > { %9 = vpow2.f32 %v6_v6 /* loc("/k.py":10:2) */  ;;  %10 = dma.hbm_to_vmem [thread:$0] %s3_s3, 64 }
   0x8 PF: > { %p7_p7 = scmp.ge.s32.totalorder %s2_s2, 10 /* loop exit test */  ;;  %11 = sbr.rel (!%p7_p7) target = $region2 } /* Start/End empty region 4 */
   0x9   :  {}
   0xa   :  { %12 = vsyncpa [#allocation3], 1 }
"""


def test_step_signals_of_a_hand_written_dump():
    signals = kernel_signals.step_signals(kernel_signals.parse_bundles(DUMP))
    assert signals["grid_trips_per_core"] == 10
    assert signals["row_bundles"] == 2  # the init region, left out of the block step
    assert {k: signals[k] for k in ("bundles", "vmatmul", "valu", "eup", "vst", "dma", "salu")} \
        == {"bundles": 7, "vmatmul": 1, "valu": 1, "eup": 1, "vst": 0, "dma": 1, "salu": 5}
    assert signals["sources"] == {"/k.py:9": 1, "/k.py:10": 1}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e '.[tpu]'): XLA's TPU compiler")
def test_small_run_reports_every_kernel_against_the_baseline(tmp_path):
    out = tmp_path / "signals.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_signals.py"), "--lengths", "1024",
         "--head-dims", "128", "--blocks", "128", "--impls", "jax_flash,lctx", "--json",
         str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]["tpu"]
    assert {(r["impl"], r["direction"]) for r in rows} == {
        (impl, d) for impl in ("jax_flash", "lctx") for d in ("fwd", "dq", "dkv")}, rows
    for row in rows:
        assert "error" not in row, row
        # (not dma: XLA may place a small operand whole in VMEM, with no per-step copy)
        for key in ("bundles", "vmatmul", "vmatpush", "valu", "eup", "vld", "salu",
                    "vmem_bytes"):
            assert row[key] > 0, (row["impl"], row["direction"], key)
    lines = run.stdout.splitlines()
    baseline = [line for line in lines if line.startswith("jax_flash ")]
    assert len(baseline) == 6  # fwd, dq, dkv in both tables
    per_push = [line for line in lines if line.startswith("lctx ") and " n/a " not in line]
    assert len(per_push) >= 3
