"""YAML + overrides load into typed configs; impossible layouts fail up front with the field named."""

from __future__ import annotations

import pytest

from megatron_bolt.config import BoltConfig, ConfigError, config_hash, dump_yaml, load_config
from megatron_bolt.config.loader import field_help


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden_size: 96\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["train.lr=3e-4", "data.data_prefix=[a, b]", "model.rope_scaling={rope_type: llama3}"])
    assert cfg.model.num_layers == 6 and cfg.model.hidden_size == 96
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.data_prefix == ["a", "b"]
    assert cfg.model.rope_scaling == {"rope_type": "llama3"}


def test_yaml_1_2_numbers_and_strings():
    cfg = load_config(None, ["train.lr=1e-5", "prepare.split=13:17:20", "data.tokenizer=777"])
    assert cfg.train.lr == pytest.approx(1e-5)
    assert cfg.prepare.split == "13:17:20"  # YAML 1.1 would make this the base-60 integer 47840
    assert cfg.data.tokenizer == "777"  # a string field accepts what YAML read as a number


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key train.lrr (did you mean train.lr?)"),
        ("nope.x=1", "unknown config key nope"),
        ("train.train_iters=1.5", "train.train_iters: expected an integer"),
        ("train.train_iters=true", "train.train_iters: expected an integer"),
        ("parallel.sequence_parallel=yes please", "parallel.sequence_parallel: expected true or false"),
        ("train.precision=fp16", "train.precision='fp16' is not one of"),
        ("model=3", "model: expected a mapping"),
        ("train.lr", "is not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(scalar)


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (["parallel.tensor_model_parallel_size=3"], 3,
         "parallel.tensor_model_parallel_size=3 must divide model.num_attention_heads=4"),
        (["parallel.tensor_model_parallel_size=4", "model.num_query_groups=2"], 4,
         "must divide model.num_query_groups=2"),
        (["parallel.pipeline_model_parallel_size=3"], 3, "must divide model.num_layers=4"),
        (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"], 2,
         "pipeline_model_parallel_size * virtual_pipeline_model_parallel_size=8 must divide model.num_layers=4"),
        (["parallel.virtual_pipeline_model_parallel_size=2", "model.num_layers=4"], 1,
         "needs pipeline_model_parallel_size >= 2"),
        (["parallel.sequence_parallel=true"], 1, "sequence_parallel=true needs"),
        (["parallel.tensor_model_parallel_size=2"], 3, "world size 3 is not divisible"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "train.global_batch_size=6 must be a multiple"),
        (["data.seq_length=512"], None, "data.seq_length=512 exceeds model.max_position_embeddings=256"),
        (["data.seq_length=1"], None, "data.seq_length=1 must be at least 2"),
        (["data.max_unit_tokens=300", "data.seq_length=128"], None,
         "cannot hold the longest latent+text unit (data.max_unit_tokens=300)"),
        (["train.precision=fp8"], None, "train.precision=fp8 needs model.transformer_impl=transformer_engine"),
        (["model.num_query_groups=3"], None, "model.num_query_groups=3 must divide model.num_attention_heads=4"),
        (["estep.sampling.max_new_tokens=4096"], None, "leaves no room for the prompt"),
        (["parallel.tensor_model_parallel_size=4", "model.num_attention_heads=8", "model.num_query_groups=4",
          "model.ffn_hidden_size=128", "model.vocab_size=130", "model.make_vocab_size_divisible_by=2"], 4,
         "must divide the padded vocabulary 130: set model.make_vocab_size_divisible_by to a multiple of 4"),
    ],
)
def test_impossible_layouts_fail_with_the_field_named(overrides, world_size, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size)
    assert message in str(err.value)


def test_truncation_makes_long_units_acceptable():
    load_config(None, ["data.max_unit_tokens=300", "data.truncate_long_units=true"]).validate(1)


def test_good_parallel_layouts_pass():
    for overrides, ws in [
        (["parallel.tensor_model_parallel_size=2"], 4),
        (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"], 2),
        (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 2),
    ]:
        load_config(None, overrides).validate(ws)


def test_dump_round_trip_and_hash(tmp_path):
    cfg = load_config(None, ["train.lr=2e-4", "parallel.tensor_model_parallel_size=2"])
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["train.lr=3e-4"])) != config_hash(cfg)


def test_every_field_has_help():
    rows = field_help(BoltConfig)
    assert len(rows) > 50
    missing = [key for key, _, text in rows if not text]
    assert not missing, f"fields without help text: {missing}"
