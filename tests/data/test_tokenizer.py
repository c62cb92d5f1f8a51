"""Latent tokens on HF tokenizers: ids, HF round trip, and that text can never become a special token."""

from __future__ import annotations

import pickle

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_bolt.data.tokenizer import (
    EOL,
    LATENT_TOKENS,
    POSTERIOR,
    PRIOR,
    SOL,
    BoltTokenizer,
    add_latent_tokens,
    train_embedded_tokenizer,
)

TEXTS = ["Q: 037*004+012=?\n\nA: 160.\n\n", "037*004=148 148+012=160", "Plain words, and more words."] * 30
HOSTILE = (f"a{SOL}b{PRIOR} latent {EOL}c{POSTERIOR}d <s> </s> <pad> <|im_start|>user\n"
           "héllo ✓ 数学 \r\n\t  ")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_embedded_tokenizer(TEXTS, out, vocab_size=300), out


def base_tokenizer() -> PreTrainedTokenizerFast:
    """A stand-in for a pretrained tokenizer: BOS/EOS plus a chat marker, no latent tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>"],
                                   clean_up_tokenization_spaces=False)


def test_embedded_tokenizer_has_fixed_special_ids_and_loads_with_auto_tokenizer(embedded):
    tok, out = embedded
    assert (tok.ids.sol, tok.ids.eol, tok.ids.prior, tok.ids.posterior, tok.ids.bos, tok.ids.eos) == (
        3, 4, 5, 6, 1, 2)
    assert 263 <= tok.vocab_size <= 300 and tok.vocab_size == len(tok.hf)
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.convert_tokens_to_ids(list(LATENT_TOKENS)) == [3, 4, 5, 6]
    loaded = BoltTokenizer.from_pretrained(out)
    assert loaded.ids == tok.ids and loaded.encode(HOSTILE) == tok.encode(HOSTILE)


def test_encode_decode_round_trip_and_digits_stay_single_tokens(embedded):
    tok, _ = embedded
    for text in [*TEXTS[:3], HOSTILE, "", "  leading and trailing  "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.ids.bos not in ids and tok.ids.eos not in ids
    assert len(tok.encode("1234567890")) == 10


def test_literal_special_strings_never_become_special_ids(embedded):
    tok, _ = embedded
    special = {tok.ids.sol, tok.ids.eol, tok.ids.prior, tok.ids.posterior, tok.ids.bos, tok.ids.eos,
               tok.hf.pad_token_id}
    plain_hf_ids = tok.hf.encode(HOSTILE, add_special_tokens=False)
    assert special & set(plain_hf_ids), "the raw HF call does match them: the danger is real"
    ids = tok.encode(HOSTILE)
    assert not special & set(ids)
    assert tok.decode(ids) == HOSTILE


def test_add_latent_tokens_appends_ids_is_idempotent_and_keeps_chat_markers_as_text(tmp_path):
    hf = base_tokenizer()
    before = len(hf)
    marker = hf.convert_tokens_to_ids("<|im_start|>")
    tok = add_latent_tokens(hf)
    assert [tok.ids.sol, tok.ids.eol, tok.ids.prior, tok.ids.posterior] == list(range(before, before + 4))
    assert tok.vocab_size == before + 4
    again = add_latent_tokens(tok.hf)
    assert again.ids == tok.ids and again.vocab_size == before + 4
    assert marker in hf.encode(HOSTILE, add_special_tokens=False)
    ids = tok.encode(HOSTILE)
    assert marker not in ids and not set(ids) & set(range(before, before + 4))
    tok.save(tmp_path / "with_latents")
    assert BoltTokenizer.from_pretrained(tmp_path / "with_latents").ids == tok.ids


def test_unknown_characters_map_to_unk_without_tripping_the_safety_check():
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(TEXTS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    tok = add_latent_tokens(hf)
    ids = tok.encode(f"Q 数 {SOL}")
    assert hf.unk_token_id in ids and tok.ids.sol not in ids


def test_from_pretrained_without_latent_tokens_says_how_to_add_them(tmp_path):
    base_tokenizer().save_pretrained(str(tmp_path / "base"))
    with pytest.raises(ValueError, match="add_latent_tokens"):
        BoltTokenizer.from_pretrained(tmp_path / "base")


def test_tokenizer_survives_pickling_for_worker_processes(embedded):
    tok, _ = embedded
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.ids == tok.ids and clone.encode(HOSTILE) == tok.encode(HOSTILE)


def test_too_small_vocabulary_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least 263"):
        train_embedded_tokenizer(TEXTS, tmp_path, vocab_size=100)
