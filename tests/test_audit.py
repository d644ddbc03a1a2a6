"""Every kernel compiles ahead of time for Hopper (sm_90a) at Llama-3-8B shapes with no register
spills, memory-bound kernels issue 128-bit loads, and attention uses HGMMA (bench/audit.py).

The audit compiles real kernels, so it runs in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _audit(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "audit", "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    reports = json.loads(out.read_text()) if out.exists() else []
    return proc, reports


MATRIX_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}


@pytest.mark.parametrize("group,kernels", [
    ("memory", {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel"}),
    ("attention", MATRIX_KERNELS | {"_attn_bwd_delta_kernel", "_attn_decode_kernel", "_attn_decode_combine_kernel"}),
])
def test_sm90a_no_spills_at_llama3_8b(tmp_path, group, kernels):
    proc, reports = _audit(tmp_path, "--model", "llama3-8b", "--arch", "90", "--group", group)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["kernel"] for r in reports} == kernels
    for r in reports:
        assert r["arch"] == 90 and r["spill_bytes"] == 0, r
        if r["kernel"] in MATRIX_KERNELS:
            assert r["hgmma"] > 0, r  # every autotuning config of the attention kernels
        else:
            assert r["ldg128"] > 0, r
