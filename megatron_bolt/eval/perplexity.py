"""Raw perplexity of plain held-out text: how well a model predicts X alone, with no latent written.

This is the paper's raw-data view of a model (p(X), not the ELBO of p(Z, X)). A latent-trained model still
assigns some probability to SOL at chunk boundaries; that mass counts against it here, which is exactly what
"raw perplexity" means. Each text is ``BOS + encode(text)``; texts longer than the model's context are scored
in windows that overlap by one token, so every token after BOS is predicted exactly once (later windows see
only their own context). The model is the exported HF directory, loaded with transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_bolt.data.tokenizer import BoltTokenizer


@torch.inference_mode()
def text_perplexity(model_dir: str | Path, texts: list[str], device: str | None = None) -> dict[str, float | int]:
    """{perplexity, nll_per_token, bits_per_byte, tokens, documents} over ``texts``."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = BoltTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    context = int(json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"])
    total_nll, tokens, nbytes = 0.0, 0, 0
    for text in texts:
        ids = [tokenizer.ids.bos, *tokenizer.encode(text)]
        nbytes += len(text.encode("utf-8"))
        for start in range(0, max(len(ids) - 1, 0), context - 1):
            window = torch.tensor(ids[start:start + context], device=device)[None]
            logits = model(input_ids=window).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, window[0, 1:, None])
            total_nll -= float(logp.sum())
            tokens += window.shape[1] - 1
    if tokens == 0:
        raise ValueError("no tokens to score: every text is empty")
    return {"perplexity": math.exp(total_nll / tokens), "nll_per_token": total_nll / tokens,
            "bits_per_byte": total_nll / math.log(2) / max(nbytes, 1), "tokens": tokens, "documents": len(texts)}
