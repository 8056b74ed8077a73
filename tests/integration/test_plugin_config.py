"""Issue test 6 without an engine: flags, per-request values and fail-closed start-up checks, on
the real vLLM 0.24 parser, config builder and KV-cache specs (no model weights are loaded)."""

from __future__ import annotations

import pytest

from kvd_helpers import model_path


@pytest.fixture(scope="module")
def plugin():
    from vllm_defensive.plugin import register

    register()  # idempotent; vLLM itself calls it when it builds EngineArgs


@pytest.fixture(scope="module")
def parser(plugin):
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def engine_args(parser, *argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model_path(), *argv]))


def test_serve_help_lists_the_flags_in_their_own_group(parser):
    group = next(g for g in parser._action_groups if g.title == "KVEviction")
    flags = {o for a in group._group_actions for o in a.option_strings}
    assert flags == {"--kv-eviction", "--kv-budget", "--kv-budget-tokens", "--kv-window", "--kv-sink",
                     "--kv-min-prompt"}
    assert "KVEviction" in parser.format_help()


def test_flags_land_in_additional_config(parser):
    args = engine_args(parser, "--kv-eviction", "defensive", "--kv-budget", "0.2", "--kv-window", "16",
                       "--kv-sink", "4", "--kv-min-prompt", "100")
    assert args.additional_config["kv_eviction"] == {"method": "defensive", "budget": 0.2, "window": 16,
                                                     "sink_tokens": 4, "min_prompt": 100}
    assert "kv_eviction" not in (engine_args(parser).additional_config or {})  # no flag: plugin off


@pytest.mark.parametrize("argv, message", [
    (["--kv-eviction", "defensive", "--kv-budget", "1.5"], "--kv-budget: must be a fraction"),
    (["--kv-eviction", "defensive", "--kv-budget", "0"], "--kv-budget: must be a fraction"),
    (["--kv-eviction", "bogus"], "--kv-eviction: invalid choice"),
    (["--kv-eviction", "snapkv", "--kv-window", "0"], "--kv-window: must be >= 1"),
    (["--kv-eviction", "snapkv", "--kv-budget-tokens", "many"], "--kv-budget-tokens: expected an integer"),
])
def test_bad_flags_stop_the_parser_naming_the_flag(parser, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parser.parse_args([model_path(), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--kv-budget", "0.3"], "--kv-budget given without --kv-eviction"),
    (["--kv-eviction", "snapkv", "--kv-budget", "0.3", "--kv-budget-tokens", "64"], "exclusive"),
])
def test_inconsistent_flags_are_refused(parser, argv, message):
    with pytest.raises(ValueError, match=message):
        engine_args(parser, *argv)


def test_bad_additional_config_names_the_field(plugin):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="--kv-window"):
        EngineArgs(model=model_path(), additional_config={"kv_eviction": {"window": -3}}).create_engine_config()
    with pytest.raises(ValueError, match="wndow"):
        EngineArgs(model=model_path(), additional_config={"kv_eviction": {"wndow": 3}}).create_engine_config()


def test_policy_fields_go_next_to_the_server_fields():
    """Any EvictionConfig field may sit in additional_config["kv_eviction"] itself (the README's
    `--additional-config '{"kv_eviction": {"uniform_norm": "share"}}'`), or under "policy"."""
    from vllm_defensive.integration.config import server_config

    top = server_config({"kv_eviction": {"budget": 0.3, "uniform_norm": "share", "uniform_floor": False}})
    nested = server_config({"kv_eviction": {"budget": 0.3, "policy": {"uniform_norm": "share", "uniform_floor": False}}})
    assert top.defaults() == nested.defaults()
    assert top.defaults().uniform_norm == "share" and not top.defaults().uniform_floor
    for bad, field in (({"uniform_norm": "x"}, "uniform_norm"), ({"bogus": 1}, "bogus"),
                       ({"uniform_norm": "raw", "policy": {"uniform_norm": "share"}}, "given twice")):
        with pytest.raises(ValueError, match=field):
            server_config({"kv_eviction": bad})


@pytest.mark.parametrize("kwargs, message", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
     "speculative decoding"),
    ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}}, "KV connectors"),
    ({"kv_cache_dtype": "fp8"}, "quantized KV cache"),
])
def test_unsupported_configurations_fail_closed(plugin, kwargs, message):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_defensive.integration.compat import UnsupportedVllmError

    args = EngineArgs(model=model_path(), dtype="float32", max_model_len=1024,
                      additional_config={"kv_eviction": {"method": "defensive"}}, **kwargs)
    try:
        config = args.create_engine_config()
    except UnsupportedVllmError as e:
        assert message in str(e) and "serve without --kv-eviction" in str(e)
        return
    except Exception as e:  # vLLM refused it first on this platform: also closed
        pytest.skip(f"vLLM rejects this configuration itself here: {type(e).__name__}: {e}")
    pytest.fail(f"accepted: {config}")


def test_same_configurations_without_eviction_are_left_to_vllm(plugin):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=model_path(), dtype="float32", max_model_len=1024,
                        kv_cache_dtype="fp8").create_engine_config()
    assert config.cache_config.cache_dtype == "fp8"


def test_eviction_pins_the_v1_model_runner_and_disables_cascade_attention(plugin):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=model_path(), dtype="float32", max_model_len=1024,
                        additional_config={"kv_eviction": {"method": "snapkv"}}).create_engine_config()
    assert config.use_v2_model_runner is False
    assert config.model_config.disable_cascade_attn is True


def test_models_that_are_not_plain_full_attention_are_refused(plugin):
    """The engine core refuses KV-cache layouts other than one full-attention group (checked on
    vLLM's own spec objects, as the scheduler sees them)."""
    import torch
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                            SlidingWindowSpec)

    from vllm_defensive.integration.compat import UnsupportedVllmError
    from vllm_defensive.integration.scheduler import check_kv_cache_groups

    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16)
    window = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16,
                               sliding_window=128)
    ok = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["a"], full)])
    check_kv_cache_groups(ok)
    for groups in ([KVCacheGroupSpec(["a"], window)],
                   [KVCacheGroupSpec(["a"], full), KVCacheGroupSpec(["b"], window)]):
        bad = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=groups)
        with pytest.raises(UnsupportedVllmError, match="SlidingWindowSpec"):
            check_kv_cache_groups(bad)


def test_other_vllm_versions_are_refused(monkeypatch):
    import vllm

    from vllm_defensive.integration import compat

    monkeypatch.setattr(vllm, "__version__", "0.25.0")
    with pytest.raises(compat.UnsupportedVllmError, match="supports vLLM 0.24.0 only, but vLLM 0.25.0"):
        compat.check_version()
    monkeypatch.setattr(vllm, "__version__", "0.24.0+cpu")
    compat.check_version()


def test_every_patch_target_exists_in_this_vllm():
    from vllm_defensive.integration import compat

    compat.verify_targets()


def test_request_values_are_validated_naming_the_field():
    from vllm.exceptions import VLLMValidationError

    from vllm_defensive.integration.config import ServerConfig
    from vllm_defensive.integration.frontend import validate

    server = ServerConfig(method="defensive", budget=0.2)
    validate(server, {"kv_budget": 0.5, "kv_eviction": "snapkv", "kv_protect_suffix": 8}, prompt_len=100)
    validate(server, {"kv_budget_tokens": 64})
    validate(server, {"unrelated": 1})
    cases = [
        ({"kv_budget": 1.5}, "kv_budget"), ({"kv_budget": "0.2"}, "kv_budget"), ({"kv_budget": 0}, "kv_budget"),
        ({"kv_eviction": "bogus"}, "kv_eviction"), ({"kv_eviction": 3}, "kv_eviction"),
        ({"kv_budget_tokens": 0}, "kv_budget_tokens"), ({"kv_protect_suffix": -1}, "kv_protect_suffix"),
        ({"kv_budgt": 0.2}, "kv_budgt"), ({"kv_budget": 0.2, "kv_budget_tokens": 5}, "kv_budget"),
        ({"kv_uniform_norm": "rw"}, "kv_uniform_norm"), ({"kv_uniform_norm": 1}, "kv_uniform_norm"),
        ({"kv_uniform_floor": 2}, "kv_uniform_floor"), ({"kv_uniform_floor": "yes"}, "kv_uniform_floor"),
        ({"kv_uniform_risk_first": 1.5}, "kv_uniform_risk_first"), ({"kv_uniform_risk_first": "0.5"}, "kv_uniform_risk_first"),
    ]
    # DefensiveKV's within-head ranking is a request field too; the OpenAI schema of vllm_xargs
    # turns JSON true into 1, so 1 / 0 mean true / false
    from vllm_defensive.integration.config import resolve

    for flag in (True, 1):
        cfg = resolve(server, {"kv_uniform_floor": flag, "kv_uniform_norm": "raw"})
        assert cfg.uniform_floor is True and cfg.uniform_norm == "raw"
    assert resolve(server, {"kv_uniform_floor": 0}).uniform_floor is False
    assert resolve(server, {"kv_uniform_risk_first": 0}).uniform_risk_first == 0.0
    for extra, field in cases:
        with pytest.raises(VLLMValidationError) as e:
            validate(server, extra)
        assert e.value.parameter == field and str(e.value).startswith(field), (extra, str(e.value))
    with pytest.raises(VLLMValidationError, match="kv_protect_suffix"):
        validate(server, {"kv_protect_suffix": 100}, prompt_len=100)
    with pytest.raises(VLLMValidationError, match="not enabled on this server"):
        validate(None, {"kv_budget": 0.2})
