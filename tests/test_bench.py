import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.skipif(not (BENCH / "bench_moe.py").is_file(), reason="needs the source tree")
def test_bench_moe_quick_runs_and_writes_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_moe.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"hf_loop:eager", "moecache:eager"}
    assert all(r["ms"] > 0 and r["device"] and r["commit"] and r["torch"] for r in rows)
