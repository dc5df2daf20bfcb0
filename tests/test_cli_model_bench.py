"""The `harvest model make-tiny` and `harvest bench engine --quick` entry points."""

from __future__ import annotations

import json
import math

from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from harvest.cli import app

runner = CliRunner()


def test_make_tiny_cli_writes_a_loadable_model(tmp_path):
    result = runner.invoke(app, ["model", "make-tiny", str(tmp_path / "m"), "--arch", "qwen2"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "qwen2"
    assert tok.decode(tok.encode("The miller ran.")) == "The miller ran."
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.count("<|im_start|>") == 1


def test_make_tiny_cli_rejects_unknown_arch(tmp_path):
    result = runner.invoke(app, ["model", "make-tiny", str(tmp_path / "m"), "--arch", "bert"])
    assert result.exit_code != 0
    assert "--arch" in result.output


def test_bench_engine_quick_writes_finite_json(tmp_path):
    result = runner.invoke(app, ["bench", "engine", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "engine.json").read_text())
    for key in ("engine_tokens_per_s", "bare_loop_tokens_per_s", "hf_cb_tokens_per_s"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert data["machine"]["cpu_count"] >= 1
    assert (tmp_path / "engine.png").stat().st_size > 0


def test_bench_rejects_unknown_suite(tmp_path):
    result = runner.invoke(app, ["bench", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown suite" in result.output
