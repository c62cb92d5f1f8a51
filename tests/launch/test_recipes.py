"""Recipes and their YAML files load, agree with each other and validate at the world sizes they are meant for."""

from __future__ import annotations

import pytest
from conftest import ROOT

from megatron_bolt.config.loader import load_config
from megatron_bolt.em.plan import build_plan
from megatron_bolt.launch.cluster import load_cluster
from megatron_bolt.recipes import tiny_cpu_quickstart, tinyllama_finemath_bolt

EXAMPLES = ROOT / "examples"


def _leaves(data: dict, prefix: tuple[str, ...] = ()):
    for key, value in data.items():
        yield from _leaves(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]


def _get(cfg, path: tuple[str, ...]):
    for key in path:
        cfg = getattr(cfg, key)
    return cfg


@pytest.mark.parametrize("world_size", [8, 16, 48])
def test_tinyllama_recipe_and_yaml_agree_and_validate(world_size):
    cfg = load_config(None, base=tinyllama_finemath_bolt())
    assert cfg == load_config(EXAMPLES / "tinyllama_finemath.yaml")
    cfg.validate(world_size)


def test_tinyllama_is_the_papers_setting():
    cfg = load_config(EXAMPLES / "tinyllama_finemath.yaml")
    m, t, s = cfg.model, cfg.train, cfg.estep.sampling
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size) == \
        (2048, 22, 32, 4, 5632)
    assert m.vocab_size == 32000 + 4 and not m.tie_word_embeddings and m.rotary_base == 10000.0
    assert t.global_batch_size * cfg.data.seq_length == 393_216
    assert abs(t.train_iters * 393_216 - 13e9) < 393_216  # 13B tokens a bootstrap M-step
    assert (t.lr, t.lr_warmup_iters, t.adam_beta2, t.weight_decay, t.clip_grad, t.precision) == \
        (1e-4, 1000, 0.95, 0.01, 1.0, "bf16")
    assert (s.num_samples, s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.backend) == \
        (4, 1.0, 1.0, 0, 1024, "trtllm")
    assert cfg.estep.prefix_chunks == 3 and cfg.em.iterations == 3 and cfg.em.restart_from_base
    plan = build_plan(cfg, cfg.em.run_dir, f"{cfg.em.run_dir}/config.yaml")
    assert len(plan) == 5 + 3 * 8 and {s.array for s in plan if s.array} == {64}


def test_tiny_em_yaml_mirrors_the_quickstart_recipe():
    """Every setting the quickstart recipe makes, the YAML makes too; the YAML adds the data paths."""
    recipe, yaml_cfg = tiny_cpu_quickstart(), load_config(EXAMPLES / "tiny_em.yaml")
    base = load_config(None, base=recipe)
    for path in _leaves(recipe):
        assert _get(yaml_cfg, path) == _get(base, path), ".".join(path)
    yaml_cfg.validate(1)
    assert len(build_plan(yaml_cfg, yaml_cfg.em.run_dir, "config.yaml")) == 5 + 2 * 8


def test_example_cluster_trains_the_tinyllama_recipe():
    cluster = load_cluster(EXAMPLES / "cluster.yaml")
    assert cluster.image_for("sample") != cluster.image_for("train")  # TensorRT-LLM has its own image
    world = cluster.train.nodes * cluster.train.gpus_per_node
    load_config(EXAMPLES / "tinyllama_finemath.yaml").validate(world)
    load_config(EXAMPLES / "tinyllama_finemath.yaml").validate(2 * world)  # cluster.train.nodes=2
