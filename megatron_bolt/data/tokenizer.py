"""The four latent tokens on top of any Hugging Face fast tokenizer, and a tiny tokenizer for offline runs.

BoLT adds ``<|START_OF_LATENT|>``, ``<|END_OF_LATENT|>``, ``<|PRIOR_PREFIX|>`` and ``<|POSTERIOR_PREFIX|>``
to the base vocabulary (bolt-method.md). Sequence layouts place them by id, so ``BoltTokenizer.encode``
treats text as text: a document or a latent that happens to contain one of those strings (or ``<s>``,
``</s>``, chat markers or any other special token) is tokenized as ordinary characters and can never
inject a control token into the training data. ``encode`` adds no BOS/EOS either; ``ids`` has them.

``train_embedded_tokenizer`` builds the small byte-level BPE used by the embedded corpus (no download):
every byte is in the vocabulary, so any text round-trips exactly, and digits are kept as single tokens so
that the arithmetic of the embedded task stays visible to the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

SOL = "<|START_OF_LATENT|>"
EOL = "<|END_OF_LATENT|>"
PRIOR = "<|PRIOR_PREFIX|>"
POSTERIOR = "<|POSTERIOR_PREFIX|>"
LATENT_TOKENS = (SOL, EOL, PRIOR, POSTERIOR)

EMBEDDED_BOS, EMBEDDED_EOS, EMBEDDED_PAD = "<s>", "</s>", "<pad>"


@dataclass(frozen=True)
class LatentTokenIds:
    sol: int
    eol: int
    prior: int
    posterior: int
    bos: int
    eos: int


class TokenizerError(ValueError):
    """A tokenizer directory that cannot serve BoLT (missing, unreadable, or without the latent tokens)."""


class BoltTokenizer:
    """A transformers fast tokenizer that holds the latent tokens, with injection-safe ``encode``."""

    def __init__(self, hf: Any):
        if not getattr(hf, "is_fast", False):
            raise TokenizerError(f"{type(hf).__name__} is not a fast (tokenizers-backed) tokenizer")
        self.hf = hf
        vocab = hf.get_vocab()
        missing = [t for t in LATENT_TOKENS if t not in _special_added_tokens(hf)]
        if missing:
            raise TokenizerError(
                f"tokenizer lacks the latent tokens {missing} (as special tokens): add them with "
                "megatron_bolt.data.tokenizer.add_latent_tokens(AutoTokenizer.from_pretrained(path)).save(path)"
            )
        if hf.bos_token_id is None or hf.eos_token_id is None:
            raise TokenizerError("tokenizer has no BOS or EOS token: set bos_token and eos_token first")
        self.ids = LatentTokenIds(*(vocab[t] for t in LATENT_TOKENS), bos=hf.bos_token_id,
                                  eos=hf.eos_token_id)
        # A private copy of the backend with special-token matching off: special strings in text stay text.
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        self._backend.encode_special_tokens = True
        special = {i for i, tok in hf.added_tokens_decoder.items() if tok.special}
        special |= set(hf.all_special_ids) | set(astuple(self.ids))
        self._special_ids = frozenset(special - {hf.unk_token_id})  # UNK marks unknown text, not injection

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BoltTokenizer:
        """Load a local tokenizer directory; TokenizerError (naming ``path``) when it cannot serve BoLT."""
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise TokenizerError(f"tokenizer directory {path} does not exist (or is not a directory)")
        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # transformers' "can't load" family
            raise TokenizerError(f"{path}: not a loadable Hugging Face tokenizer ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else exc!r})") from None
        try:
            return cls(hf)
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from None

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (the model pads this up)."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: no BOS/EOS, never a special-token id."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if not self._special_ids.isdisjoint(ids):  # only a tokenizer whose merges build a special token
            raise TokenizerError(f"tokenizing {text[:80]!r} produced special-token ids; this tokenizer is unsafe")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))

    def __getstate__(self) -> dict[str, Any]:  # pickled into worker processes: rebuild the backend there
        return {"hf": self.hf}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["hf"])


def _special_added_tokens(hf: Any) -> set[str]:
    return {tok.content for tok in hf.added_tokens_decoder.values() if tok.special}


def add_latent_tokens(hf_tokenizer: Any) -> BoltTokenizer:
    """Add the four latent tokens as special tokens (appended ids; a no-op when present)."""
    present = _special_added_tokens(hf_tokenizer)
    new = [t for t in LATENT_TOKENS if t not in present]
    if new:
        hf_tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    return BoltTokenizer(hf_tokenizer)


def train_embedded_tokenizer(texts: Iterable[str], out_dir: str | Path,
                             vocab_size: int = 300) -> BoltTokenizer:
    """Byte-level BPE trained on ``texts``, saved in HF form to ``out_dir``; returns it loaded.

    ``vocab_size`` is an upper bound of at least 263 (256 bytes + 7 specials); a small corpus may yield
    fewer merges. Special ids are fixed: 0 pad, 1 BOS, 2 EOS, 3-6 the latent tokens. Digits never merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EMBEDDED_PAD, EMBEDDED_BOS, EMBEDDED_EOS, *LATENT_TOKENS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} must be at least {len(alphabet) + len(specials)}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EMBEDDED_BOS, eos_token=EMBEDDED_EOS,
                                 pad_token=EMBEDDED_PAD, clean_up_tokenization_spaces=False)
    tokenizer = add_latent_tokens(hf)
    tokenizer.save(out_dir)
    return tokenizer
