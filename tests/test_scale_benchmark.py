"""benchmarks/scale.py at its smallest (one copy of the embedded text, no baseline): every stage runs in
its own process and gets a row with its seconds, tokens/s and peak memory. (What the figures are is not
tested: they depend on the machine.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_benchmark_prints_a_row_per_stage(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--tokens", "1M", "--baseline", "none",
                          "--root", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {m.group(1): m for m in re.finditer(r"^\s+\d+M (\w+)\s+this\s+([\d.]+)\s+([\d,]+)\s+([\d,]+)", out.stdout, re.M)}
    assert set(rows) == {"corpus", "tokenizer", "pairs"}, out.stdout
    for m in rows.values():
        assert float(m.group(2)) > 0 and int(m.group(3).replace(",", "")) > 0
        assert int(m.group(4).replace(",", "")) > 100  # MiB: a Python process with the stack loaded
    assert not any(tmp_path.glob("work-this-*"))  # workdirs removed without --keep
