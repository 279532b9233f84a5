"""README's "Use from Python" script, run as written (on a small generated text), so the
public API it shows cannot drift from the code."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import word_text

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(heading):
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README section {heading!r} has no python block"
    return match.group(1)


def test_use_from_python_script_runs(tmp_path):
    (tmp_path / "input.txt").write_text(word_text(3000))
    script = tmp_path / "demo.py"
    script.write_text(_python_block("Use from Python"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "step 300/300: loss " in out and "val loss now:" in out
    assert (tmp_path / "runs" / "demo" / "ckpt.npz").is_file()
    assert (tmp_path / "runs" / "demo" / "metrics.csv").is_file()
    # The callback saw every log interval; the loss fell on this repetitive text.
    losses = [float(m) for m in re.findall(r"step \d+/300: loss (\d+\.\d+)", out)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # The last line is evaluate_checkpoint's loss, a plain float.
    assert float(out.strip().splitlines()[-1]) > 0


def test_use_the_model_elsewhere_pytorch_snippet_runs(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from randygpt.config import Config
    from randygpt.interop import save_weights
    from randygpt.model import GPT
    from randygpt.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("ROMEO: and JULIET\n")
    model = GPT(Config(vocab_size=tok.vocab_size, n_embd=16, n_head=2, n_layer=1,
                       block_size=16)).eval()
    save_weights(tmp_path / "model.safetensors", model, tok)
    script = tmp_path / "snippet.py"
    script.write_text(_python_block("Use the model elsewhere")
                      + "\nimport numpy\nnumpy.save('logits.npy', logits.detach().numpy())\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    theirs = np.load(tmp_path / "logits.npy")
    ours = model.forward(tok.encode("ROMEO:")[None, :])
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
