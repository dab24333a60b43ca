import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHARED, needs_shared

from batchflip.battery import build_battery
from batchflip.errors import InputError

DEFAULT = ROOT / "resources" / "battery" / "default"


@needs_shared
def test_paper_battery_reproduces_all_953_prompts():
    df = build_battery([SHARED / "paper_battery"])
    assert len(df) == 953 and df["prompt_id"].is_unique
    counts = df.groupby("task").size().to_dict()
    assert counts == {"advbench_refusal": 100, "jailbreak_amplification": 120, "bbq_bias": 198,
                      "truthfulqa": 50, "mmlu_real": 285, "arc_challenge": 200}
    assert df.groupby("domain").size().to_dict() == {"safety": 468, "capability": 485}
    # prompt bytes: tests/test_tasks.py compares all 953 with the harness's own rendering
    jb = df[df["task"] == "jailbreak_amplification"]
    assert json.loads(jb.iloc[0]["meta"])["jailbreak_type"] == "direct"


def test_default_battery_shape():
    df = build_battery([DEFAULT])
    by_task = df.groupby("task").size().to_dict()
    assert by_task["harmful_refusal"] >= 40
    assert by_task["borderline_safe"] >= 20
    assert by_task["mc_capability"] >= 60
    mc = df[df["task"] == "mc_capability"]
    assert set(mc["reference"]) <= set("ABCD") and mc["domain"].eq("capability").all()
    assert df["prompt_id"].is_unique


def _write(tmp: Path, name: str, doc: dict) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(doc))
    return p


BASE = {"name": "t", "task_type": "safety_refusal", "prompt_template": "{{ instruction }}",
        "samples": [{"id": "x1", "instruction": "hi", "reference": "REFUSAL_EXPECTED"}]}


def test_missing_field_names_file_sample_and_field(tmp_path):
    doc = {**BASE, "samples": [{"id": "x1", "instruction": "hi"}]}
    p = _write(tmp_path, "t.yaml", doc)
    with pytest.raises(InputError) as err:
        build_battery([p])
    msg = str(err.value)
    assert "t.yaml" in msg and "sample 1 (id x1)" in msg and "'reference'" in msg


def test_template_variable_missing_in_sample(tmp_path):
    doc = {**BASE, "prompt_template": "{{ instruction }} {{ context }}"}
    p = _write(tmp_path, "t.yaml", doc)
    with pytest.raises(InputError) as err:
        build_battery([p])
    assert "t.yaml" in str(err.value) and "'context'" in str(err.value)
    assert "id x1" in str(err.value)


def test_duplicate_ids_across_files(tmp_path):
    _write(tmp_path, "a.yaml", BASE)
    _write(tmp_path, "b.yaml", {**BASE, "name": "u"})
    with pytest.raises(InputError, match="duplicate prompt id 'x1'") as err:
        build_battery([tmp_path])
    assert "b.yaml" in str(err.value) and "'id'" in str(err.value)


def test_cli_bad_input_leaves_no_output(tmp_path):
    p = _write(tmp_path, "t.yaml", {**BASE, "task_type": "nonsense"})
    out = tmp_path / "out.parquet"
    proc = subprocess.run([sys.executable, "-m", "batchflip", "battery", str(p), "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "t.yaml" in proc.stderr and "task_type" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [p]
