"""The plugins' option fields are the core's: same types, bounds and docs as EngineConfig and SamplingParams."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from langchain_optimum_nvidia import ChatOptimumNvidia, OptimumNvidia
from llamaindex_optimum_nvidia import OptimumNvidiaLLM
from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.plugin_options import ENGINE_FIELDS, SAMPLING_FIELDS
from optimum_nvidia_core.sampling_params import SamplingParams

PLUGINS = [ChatOptimumNvidia, OptimumNvidia, OptimumNvidiaLLM]


@pytest.mark.parametrize("plugin", PLUGINS)
def test_engine_fields_are_engine_config_fields(plugin):
    for name in ENGINE_FIELDS:
        ours, core = plugin.model_fields[name], EngineConfig.model_fields[name]
        assert (ours.annotation, ours.metadata, ours.default, ours.description) == \
            (core.annotation, core.metadata, core.default, core.description), name


@pytest.mark.parametrize("plugin", PLUGINS)
def test_sampling_fields_have_the_sampling_params_bounds(plugin):
    for name in SAMPLING_FIELDS:
        ours, core = plugin.model_fields[name], SamplingParams.model_fields[name]
        assert ours.metadata == core.metadata, name
        assert ours.default is None, name  # None: the request's default applies
        assert ours.description.startswith(core.description), name


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("bad", [
    {"temperature": 100.5}, {"seed": 2**63}, {"repetition_penalty": 11.0}, {"max_batch_size": 2048},
    {"top_p": 0.0}, {"kv_cache_dtype": "int8"}, {"device": "gpu"},
])
def test_out_of_bounds_values_are_refused_as_the_core_refuses_them(plugin, bad):
    name = next(iter(bad))
    core = EngineConfig if name in ENGINE_FIELDS else SamplingParams
    with pytest.raises(ValidationError, match=name):
        core(**({"model": "m"} if core is EngineConfig else {}), **bad)
    with pytest.raises(ValidationError, match=name):
        plugin(**bad)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_the_cores_cross_field_checks_run_at_construction(plugin):
    with pytest.raises(ValidationError, match="max_num_tokens"):
        plugin(max_batch_size=512, model_kwargs={"max_num_tokens": 64})
    with pytest.raises(ValidationError, match="num_kv_block"):
        plugin(model_kwargs={"num_kv_block": 64})  # a typo in an engine option fails here, not at first use
    assert plugin(temperature=100.0, seed=2**63 - 1, max_batch_size=1024).temperature == 100.0


@pytest.mark.parametrize("plugin", PLUGINS)
def test_framework_arguments_are_not_fields(plugin):
    assert "ignored_arguments" not in plugin.model_fields
    assert set(ENGINE_FIELDS) | set(SAMPLING_FIELDS) <= set(plugin.model_fields)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_unset_fields_take_the_requests_defaults_and_an_explicit_none_keeps_the_cores_meaning(plugin):
    assert plugin().sampling_params(None, {}).max_tokens == 256
    assert plugin(max_tokens=None).sampling_params(None, {}).max_tokens is None  # up to the context window
    assert plugin(temperature=None).sampling_params(None, {}).temperature == 1.0  # None is no value there
    assert plugin.model_fields["max_tokens"].description.endswith("Unset: 256.")
