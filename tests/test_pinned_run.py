"""Pinned numbers: a short run's losses and final weights, bit for bit, as the code computed
them before the run layer was rebuilt as a Trainer (commit 742411a). A refactor of the training
layer must keep them; a change that means to alter the numbers updates them and says why.

The runs use the baseline x86-64 kernels (RANDYGPT_ISA=sse2: no FMA contraction, no
CPU-dependent vector width), so the figures are the same on every x86-64 machine; the AVX paths
round differently (FMA) and would pin only one CPU family. They run in a subprocess so forcing
the ISA cannot leak into other tests.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import word_text
from randygpt import _kernels

SCRIPT = textwrap.dedent(
    """
    import csv, hashlib, json, sys
    from randygpt import checkpoint, cli
    out, data, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    flags = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "16",
             "--batch-size", "4", "--eval-iters", "2", "--eval-every", "5", "--log-every", "1",
             "--threads", "1", "--no-sample", "--warmup-iters", "2", "--lr", "3e-3",
             "--data", data, "--out", out]
    code = cli.main(extra + flags)
    ck = checkpoint.load(out + "/ckpt.npz")
    with open(out + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    print(json.dumps({"code": code, "step": ck.step,
                      "params_sha256": hashlib.sha256(ck.params.tobytes()).hexdigest(),
                      "adam_m_sha256": hashlib.sha256(ck.adam_m.tobytes()).hexdigest(),
                      "losses": [r["train_loss"] for r in rows],
                      "val": [r["val_loss"] for r in rows if r["val_loss"]]}))
    """
)

# Captured from commit 742411a (before the Trainer), RANDYGPT_ISA=sse2.
PINNED = {
    "rmsnorm": {
        "code": 0,
        "step": 12,
        "params_sha256": "5d410603d6be4f4dac5752a31a0baf814ce889d8e3361e0cbaaa9bf3b37d80f0",
        "adam_m_sha256": "c15f9af0f3d270fb8590a67f670dc57d9f674a602f31374168fce15c9432e5ee",
        "losses": ["3.134885", "3.135340", "3.134529", "3.132344", "3.127835", "3.119567",
            "3.108382", "3.069873", "3.021705", "2.943604", "2.849798", "2.594423", "2.523861"],
        "val": ["3.134966", "3.101939", "2.670825", "2.549316"],
    },
    "layernorm": {
        "code": 0,
        "step": 12,
        "params_sha256": "d41a63bed151c2d6cc915793026896195ecce543107006a2ccd347a0003a49ea",
        "adam_m_sha256": "93cb9095a1fc9b6a59ffed807392f3b18def7a0469f0777c17dee47dedc4aa20",
        "losses": ["3.134870", "3.135324", "3.134504", "3.132326", "3.127733", "3.119280",
            "3.107509", "3.067582", "3.016869", "2.934667", "2.837237", "2.567009", "2.508389"],
        "val": ["3.134947", "3.100979", "2.652748", "2.540313"],
    },
}


def _run(tmp_path, name, *args):
    data = tmp_path / "text.txt"
    if not data.exists():
        data.write_text(word_text(1500))
    env = dict(os.environ, RANDYGPT_ISA="sse2", RANDYGPT_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / name), str(data), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_sse2 = pytest.mark.skipif(
    "sse2" not in _kernels.matmul.available_isas(),
    reason="the pinned figures are for the baseline x86-64 kernels")


@needs_sse2
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_short_run_matches_the_pinned_numbers(tmp_path, norm):
    got = _run(tmp_path, "run", "12", "--norm", norm)
    assert got["code"] == 0 and got["step"] == 12
    assert got == PINNED[norm]


@needs_sse2
def test_resumed_run_matches_the_pinned_uninterrupted_run(tmp_path):
    first = _run(tmp_path, "run", "12", "--stop-at", "7")
    assert first["step"] == 7
    got = _run(tmp_path, "run", "12", "--resume", str(tmp_path / "run" / "ckpt.npz"))
    assert got["step"] == 12
    assert got["params_sha256"] == PINNED["rmsnorm"]["params_sha256"]
    assert got["adam_m_sha256"] == PINNED["rmsnorm"]["adam_m_sha256"]
    assert got["losses"] == PINNED["rmsnorm"]["losses"]
