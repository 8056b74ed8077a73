"""`vllm-defensive eval`: options and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_defensive import cli_main

VENV_BIN = Path(sys.executable).parent


def _main(argv, capsys):
    try:
        code = cli_main.main(argv)
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_console_script_lists_eval():
    out = subprocess.run([str(VENV_BIN / "vllm-defensive"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "eval" in out.stdout
    out = subprocess.run([str(VENV_BIN / "vllm-defensive"), "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for opt in ("--endpoint", "--model", "--tokenizer", "--tasks", "--lengths", "--samples", "--seed", "--methods",
                "--budgets", "--protocols", "--out", "--concurrency"):
        assert opt in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--tasks", "niah_single_9"], "unknown RULER task 'niah_single_9'"),
    (["--budgets", "0.2,1.5"], "0 < budget <= 1"),
    (["--budgets", "abc"], "is not a number"),
    (["--methods", "h2o"], "unknown method 'h2o'"),
    (["--protocols", "sideways"], "unknown protocol 'sideways'"),
    (["--lengths", "four"], "is not a number of tokens"),
    (["--samples", "0"], "must be > 0"),
    (["--concurrency", "-1"], "must be > 0"),
    (["--xargs", "{bad"], "not JSON"),
    (["--xargs", '{"uniform_norm": "raw"}'], "a JSON object of kv_* fields"),
    (["--xargs", '{"kv_budget": 0.5}'], "kv_budget come from --methods"),
])
def test_bad_options_fail_with_a_message(args, message, capsys, tmp_path):
    code, _, err = _main(["eval", "--out", str(tmp_path), "--endpoint", "http://x", "--tokenizer", "t", *args], capsys)
    assert code == 2 and message in err


def test_missing_out_and_endpoint(capsys, tmp_path, smollm2_dir):
    code, _, err = _main(["eval", "--endpoint", "http://x"], capsys)
    assert code == 2 and "--out" in err
    code, _, err = _main(["eval", "--out", str(tmp_path), "--tokenizer", smollm2_dir, "--tasks", "vt"], capsys)
    assert code == 2 and "--endpoint is required" in err
    code, _, err = _main(["eval", "--out", str(tmp_path), "--endpoint", "http://x"], capsys)
    assert code == 2 and "--tokenizer is required" in err
    code, _, err = _main(["eval", "--out", str(tmp_path), "--endpoint", "ftp://x", "--tokenizer", smollm2_dir,
                          "--tasks", "vt", "--samples", "1", "--lengths", "2048"], capsys)
    assert code == 2


def test_report_only_needs_results(capsys, tmp_path):
    code, _, err = _main(["eval", "--out", str(tmp_path), "--report-only"], capsys)
    assert code == 2 and "nothing to report" in err


def test_prepare_only_and_report_only(capsys, tmp_path, smollm2_dir, ruler_cache, ruler_data):
    from eval_helpers import SMOKE_LENGTH, SMOKE_TASKS

    code, out, err = _main(["eval", "--prepare-only", "--out", str(tmp_path), "--tokenizer", smollm2_dir,
                            "--tasks", ",".join(SMOKE_TASKS), "--lengths", "2k", "--samples", "2",
                            "--cache-dir", str(ruler_cache), "--no-progress"], capsys)
    assert code == 0, err
    assert "vt" in out and f"{SMOKE_LENGTH}: 2 samples" in out
    # report-only rebuilds every report from samples.jsonl alone
    s = ruler_data[("vt", SMOKE_LENGTH)][0]
    rec = {"model": "m", "tokens": SMOKE_LENGTH, "task": "vt", "uid": s.uid, "sample": 0, "method": "none",
           "budget": 1.0, "protocol": "query_aware", "score": 100.0, "prompt_tokens": s.prompt_tokens}
    (tmp_path / "samples.jsonl").write_text(json.dumps(rec) + "\n")
    code, out, err = _main(["eval", "--out", str(tmp_path), "--report-only", "--device", "d"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "d" and summary["runs"][0]["score"] == 100.0
    assert (tmp_path / "quality.png").is_file()
