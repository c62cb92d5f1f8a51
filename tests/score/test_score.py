"""``bolt score`` against transformers: log-probs equal log_softmax of the HF model's logits (fp32, atol and rtol
1e-5) in process (world of one) and under torchrun at TP=2, DP=2 and PP=2
(one launch of 2 gloo ranks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from test_hf_io import make_hf_model, make_tokenizer  # noqa: E402

from megatron_bolt.score import ScoreError, score_file  # noqa: E402

transformers = pytest.importorskip("transformers")
ATOL = RTOL = 1e-5
MAX_POS = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_bolt.config import BoltConfig
    from megatron_bolt.convert.hf_io import export_hf, import_hf

    tmp = tmp_path_factory.mktemp("score")
    hf_dir = tmp / "hf"
    tok = make_tokenizer(hf_dir)
    make_hf_model(hf_dir, len(tok), seed=5, max_positions=MAX_POS)
    import_hf(BoltConfig(), hf_dir, tmp / "ckpt")
    # The reference includes the latent-token rows: export the imported checkpoint and score with that HF model.
    export_hf(tmp / "ckpt", tmp / "export")
    vocab = len(tok) + 4
    gen = torch.Generator().manual_seed(7)
    lines = [{"id": i, "token_ids": torch.randint(0, vocab, (n,), generator=gen).tolist()}
             for i, n in enumerate([17, 3, 40, 1, 9, 25, 2, MAX_POS])]
    lines.append({"id": "text", "text": "the cat sat on the mat", "meta": {"k": 1}})
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return {"tmp": tmp, "ckpt": tmp / "ckpt", "export": tmp / "export", "input": inp, "lines": lines}


def reference(export_dir, token_ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([token_ids])).logits[0].double(), -1)
    return [None] + [logp[i - 1, t].item() for i, t in enumerate(token_ids) if i >= 1]


def check(out_path, setup):
    out = [json.loads(line) for line in Path(out_path).read_text().splitlines()]
    assert [r["id"] for r in out] == [r["id"] for r in setup["lines"]]
    tok = transformers.AutoTokenizer.from_pretrained(str(setup["export"]))
    for rec, src in zip(out, setup["lines"], strict=True):
        if "token_ids" in src:
            assert rec["token_ids"] == src["token_ids"]
        else:
            assert rec["text"] == src["text"] and rec["meta"] == {"k": 1}
            assert rec["token_ids"][0] == tok.bos_token_id and len(rec["token_ids"]) > 2
        assert len(rec["logprobs"]) == len(rec["token_ids"]) and rec["logprobs"][0] is None
        ref = reference(setup["export"], rec["token_ids"])
        if len(ref) > 1:
            torch.testing.assert_close(torch.tensor(rec["logprobs"][1:], dtype=torch.float64),
                                       torch.tensor(ref[1:], dtype=torch.float64), atol=ATOL, rtol=RTOL)


def test_score_matches_transformers_world_of_one(setup):
    from megatron_bolt.config import BoltConfig

    cfg = BoltConfig()
    cfg.train.micro_batch_size = 3
    cfg.train.precision = "fp32"  # on GPU too: the comparison is at fp32 tolerance
    out = setup["tmp"] / "out1.jsonl"
    assert score_file(cfg, setup["ckpt"], setup["input"], out) == len(setup["lines"])
    check(out, setup)


def test_score_rejects_long_lines(setup, tmp_path):
    from megatron_bolt import cli
    from megatron_bolt.config import BoltConfig

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"token_ids": [1, 2]}) + "\n" + json.dumps({"token_ids": [1] * (MAX_POS + 1)}) + "\n")
    with pytest.raises(ScoreError, match=r"bad.jsonl:2: 49 tokens exceed"):
        score_file(BoltConfig(), setup["ckpt"], bad, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    assert cli.main(["score", "--ckpt", str(setup["ckpt"]), "--input", str(bad), "--output",
                     str(tmp_path / "out.jsonl")]) == 2


DRIVER = """
import sys
from megatron_bolt import cli
ckpt, inp, *outs = sys.argv[1:]
layouts = ["parallel.tensor_model_parallel_size=2", "train.micro_batch_size=2",
           "parallel.pipeline_model_parallel_size=2"]
for out, layout in zip(outs, layouts, strict=True):
    args = ["score", "--ckpt", ckpt, "--input", inp, "--output", out, "train.precision=fp32"]
    assert cli.main([*args, "train.micro_batch_size=2", layout]) == 0
"""


@pytest.mark.distributed
def test_score_parallel_layouts_torchrun(setup, launch):
    """One torchrun launch of 2 gloo ranks runs the real CLI three times: TP=2, DP=2 (rank 0 merges), PP=2."""
    driver = setup["tmp"] / "driver.py"
    driver.write_text(DRIVER)
    outs = [setup["tmp"] / f"out_{name}.jsonl" for name in ("tp2", "dp2", "pp2")]
    launch([str(driver), str(setup["ckpt"]), str(setup["input"]), *map(str, outs)], nproc=2)
    for out in outs:
        check(out, setup)
