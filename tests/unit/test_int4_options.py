"""``quantization`` and ``int4_method`` reach the engine from every front door: the LangChain and LlamaIndex
fields (generated from EngineConfig, like use_fp8 and kv_cache_dtype) and the CLI's build / chat / serve flags."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from langchain_optimum_nvidia import ChatOptimumNvidia, OptimumNvidia
from llamaindex_optimum_nvidia import OptimumNvidiaLLM
from optimum_nvidia_core.cli import _engine_options, build_parser
from optimum_nvidia_core.config import EngineConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli import run_cli  # noqa: E402 - the CLI as a subprocess with a private cache

PLUGINS = [ChatOptimumNvidia, OptimumNvidia, OptimumNvidiaLLM]


def recipe_of(engine_dir: Path) -> dict:
    return json.loads((engine_dir / "manifest.json").read_text())["identity"]["recipe"]


@pytest.mark.parametrize("plugin", PLUGINS)
def test_plugin_fields_carry_int4_to_the_engine_config(plugin):
    chosen = plugin(model="some/model", quantization="int4", int4_method="gptq")
    options = chosen.engine_options()
    assert (options["quantization"], options["int4_method"]) == ("int4", "gptq")
    config = EngineConfig(model=chosen.model_id, **options)  # what get_llm -> LLM(model, **options) validates
    assert (config.quantization, config.int4_method, config.use_fp8) == ("int4", "gptq", False)
    assert "quantization" not in plugin().engine_options()  # unset: the engine's default (None)
    assert EngineConfig(model="m", **plugin(quantization="fp8").engine_options()).use_fp8  # one meaning, two spellings
    for name in ("quantization", "int4_method"):
        assert plugin.model_fields[name].description == EngineConfig.model_fields[name].description


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("bad,match", [
    ({"quantization": "int8"}, "quantization"), ({"int4_method": "hqq"}, "int4_method"),
    ({"use_fp8": True, "quantization": "int4"}, "two weight formats"),
])
def test_plugin_refuses_bad_int4_options_at_construction(plugin, bad, match):
    with pytest.raises(ValidationError, match=match):
        plugin(**bad)


def test_langchain_model_builds_and_runs_an_int4_engine(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_NVIDIA_CACHE", str(tmp_path / "cache"))
    llm = OptimumNvidia(model=str(tiny_llama_dir), quantization="int4", int4_method="rtn", device="cpu",
                        max_batch_size=2, model_kwargs={"max_num_tokens": 64}, max_tokens=3, temperature=0.0)
    try:
        assert isinstance(llm.invoke("Paris is the capital of"), str)
        (engine,) = [p.parent for p in (tmp_path / "cache").rglob("manifest.json")]
        assert (recipe_of(engine)["quantization"], recipe_of(engine)["int4_method"]) == ("int4", "rtn")
    finally:
        llm.get_llm().shutdown()


@pytest.mark.parametrize("command", ["build", "chat", "serve"])
def test_cli_flags_map_to_engine_options(command):
    args = build_parser().parse_args([command, "m", "--quantization", "int4", "--int4-method", "gptq"])
    options = _engine_options(args)
    assert (options["quantization"], options["int4_method"]) == ("int4", "gptq")
    assert "quantization" not in _engine_options(build_parser().parse_args([command, "m"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "m", "--quantization", "int8"])
    for method in get_args(EngineConfig.model_fields["int4_method"].annotation):  # every method has its flag
        assert build_parser().parse_args([command, "m", "--int4-method", method]).int4_method == method


def test_cli_build_writes_an_int4_engine(tiny_llama_dir, tmp_path):
    out = tmp_path / "engine"
    built = run_cli("build", str(tiny_llama_dir), "--device", "cpu", "--quantization", "int4", "--int4-method", "rtn",
                    "--output", str(out), cache=tmp_path / "cache")
    assert built.returncode == 0, built.stderr
    assert "quantization=int4" in built.stdout
    assert (recipe_of(out)["quantization"], recipe_of(out)["int4_method"]) == ("int4", "rtn")
