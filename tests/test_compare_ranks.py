"""`scripts/compare_ranks.py --quick` runs the whole rank comparison pipeline and writes its report."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_ranks.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_ranks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(md: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table whose first column is `first_header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", text)]


def test_quick_comparison_writes_a_table_for_every_arm_and_rank(tmp_path, stories260k, shakespeare):
    cr = load_script()
    md, png = tmp_path / "results.md", tmp_path / "img" / "ranks.png"
    fixed = ",".join(a.name for a in cr.FIXED)
    # A dynamic arm of each kind (the papers', the default, one training every nested rank, one at equal
    # compute) and the default on the float base.
    dynamic = [cr.ARMS[name] for name in ("paper_frozen", "default", "matryoshka", "distill_flops")]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--shared", str(stories260k.parents[1]), "--work-dir",
         str(tmp_path / "work"), "--out-md", str(md), "--out-png", str(png),
         "--arms", ",".join([fixed, *(a.name for a in dynamic), "float"])],
        capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = md.read_text()
    assert png.stat().st_size > 10_000

    header, rows = table_rows(text, "setting")
    ranks = len(cr.EVAL_RANKS)
    assert header == ["setting"] + [f"rank {b}" for b in cr.EVAL_RANKS] + ["worst", "AURAC", "AURAC gap"]
    assert [r[0] for r in rows] == [a.label for a in dynamic]
    reference = numbers(text.split("AURAC of the QLoRA runs", 1)[1].split("\n", 1)[0])[0]
    for row in rows:  # a gap per rank, the worst of them, AURAC and its gap to the QLoRA runs' AURAC
        gaps = numbers(" ".join(row[1:1 + ranks]))
        assert len(gaps) == ranks and all(math.isfinite(g) for g in gaps)
        assert numbers(row[1 + ranks])[0] == max(gaps)
        area, area_gap = numbers(row[2 + ranks])[0], numbers(row[3 + ranks])[0]
        assert 0 < area < 10 and abs(area_gap - 100 * (area / reference - 1)) < 0.1  # from the rounded values

    header, rows = table_rows(text, "rank b")
    assert header[:2] == ["rank b", "QLoRA trained at rank b"] and any("**default**" in h for h in header[2:])
    assert [r[0] for r in rows] == [str(b) for b in cr.EVAL_RANKS]
    for row in rows:
        assert len(row) == len(header)
        for i, c in enumerate(row[1:]):  # "loss ± spread", and "(gap%)" for the dynamic arms
            values = numbers(c)
            assert len(values) == (2 if i == 0 else 3), c
            assert all(math.isfinite(v) for v in values)
            assert 0 < values[0] < 10  # a token loss on a 512-token vocabulary: ln 512 = 6.2 at chance

    header, rows = table_rows(text, "approach")
    assert [r[1] for r in rows] == [str(len(cr.FIXED))] + ["1"] * len(dynamic)
    assert all(int(r[k].replace(",", "")) > 0 for r in rows for k in (2, 3, 4))

    _, rows = table_rows(text, "rank")
    assert [r[0] for r in rows] == ["0 (base model)"] + [str(b) for b in cr.EVAL_RANKS]
    assert all(math.isfinite(v) for r in rows for v in numbers(" ".join(r[1:])))

    # Running again keeps what is written outside the markers (the hand-written findings).
    md.write_text(text.replace("(written by hand)", "kept findings"))
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--from-json", "--shared", str(stories260k.parents[1]),
                          "--work-dir", str(tmp_path / "work"), "--out-md", str(md), "--out-png", str(png)],
                         capture_output=True, text=True, timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    again = md.read_text()
    assert "kept findings" in again and again.count(cr.BEGIN) == 1 and again.count(cr.END) == 1

    # Step times, measured alone: the cached runs are reused, only the timing runs are new.
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--shared", str(stories260k.parents[1]), "--work-dir",
                          str(tmp_path / "work"), "--out-md", str(md), "--out-png", str(png), "--arms",
                          f"{fixed},default", "--step-times", "14", "--passes", "1"],
                         capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    timed = md.read_text().split("### Step time", 1)[1]
    header, rows = table_rows(timed, "setting")
    assert header == ["setting", "ms/step", "vs QLoRA rank 16", "vs default"]
    assert [r[0] for r in rows] == [cr.ARMS["fixed16"].label, cr.ARMS["default"].label]
    assert all(numbers(r[1])[0] > 0 for r in rows) and rows[1][3] == "1.00×" and rows[0][2] == "1.00×"
