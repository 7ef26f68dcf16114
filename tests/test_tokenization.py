"""BlipTokenizer vs transformers' BertTokenizerFast set up as official BLIP does: BERT uncased
WordPiece, ``[DEC]`` added as bos token (30522), ``[ENC]`` as an additional special token
(30523)."""

import shutil

import pytest
import torch
import transformers

from blip_fast.tokenization import BlipTokenizer, find_vocab, packaged_vocab, tokenizer

SENTENCES = [
    "a picture of ",
    "A man riding a wave on top of a surfboard.",
    "Hello, world!  Isn't it great?? (yes) -- 100% sure; ok: fine~ #tag *star*",
    "Café naïve résumé Ångström façade jalapeño",
    "xqzvwk blorptastic supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a man's dog isn't here; we're sure they've gone, I'm told.",
    "中文 字符 and emoji 🙂 mixed\twith\ttabs\nand newlines",
    "[DEC] a photo [ENC] of [CLS] and [cls] [SEP] [PAD]",
    "",
    "   ",
    " ".join(["word"] * 60),
    "the quick brown fox jumps over the lazy dog " * 8,
]


@pytest.fixture(scope="module")
def ours():
    return tokenizer()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' tokenizer over the packaged vocab. Built with from_pretrained(directory):
    in transformers 5.x ``BertTokenizerFast(vocab_file=...)`` ignores the file and builds a
    5-token vocab."""
    directory = tmp_path_factory.mktemp("bert")
    shutil.copy(packaged_vocab(), directory / "vocab.txt")
    ref = transformers.BertTokenizerFast.from_pretrained(str(directory))
    ref.add_special_tokens({"bos_token": "[DEC]"})
    ref.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert len(ref) == 30524
    return ref


def test_packaged_vocab_is_bert_base_uncased():
    """Known bert-base-uncased ids, independent of any other tokenizer."""
    lines = packaged_vocab().read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30522
    ids = {t: i for i, t in enumerate(lines)}
    assert [ids[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [
        0,
        100,
        101,
        102,
        103,
    ]
    assert [ids[w] for w in ("a", "dog", "on", "beach")] == [1037, 3899, 2006, 3509]


def test_real_ids(ours):
    assert ours("a dog on a beach").input_ids.tolist() == [[101, 1037, 3899, 2006, 1037, 3509, 102]]


def test_special_ids(ours):
    assert (ours.cls_token_id, ours.sep_token_id, ours.eos_token_id, ours.pad_token_id) == (
        101,
        102,
        102,
        0,
    )
    assert (ours.bos_token_id, ours.enc_token_id) == (30522, 30523)
    assert ours.vocab_size == len(ours) == 30524


def test_ids_equal_hf_max_length(ours, hf):
    got = ours(SENTENCES, padding="max_length", truncation=True, max_length=35)
    ref = hf(SENTENCES, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert got["input_ids"].dtype == got["attention_mask"].dtype == torch.long
    assert got["input_ids"].shape == (len(SENTENCES), 35)
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["attention_mask"], ref["attention_mask"])


@pytest.mark.parametrize("max_length", [5, 35, 60])
def test_ids_equal_hf_longest(ours, hf, max_length):
    got = ours(SENTENCES, padding="longest", truncation=True, max_length=max_length)
    ref = hf(
        SENTENCES, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    assert torch.equal(got.input_ids, ref["input_ids"])
    assert torch.equal(got.attention_mask, ref["attention_mask"])


def test_single_string_and_lists(ours, hf):
    got = ours("A dog.")
    assert got.input_ids.tolist() == [hf("A dog.")["input_ids"]] == [[101, 1037, 3899, 1012, 102]]
    assert ours("A dog.", return_tensors=None).input_ids == [[101, 1037, 3899, 1012, 102]]
    assert got.to("cpu").attention_mask.tolist() == [[1] * 5]


def test_no_truncation_keeps_long_rows(ours):
    ids = ours(" ".join(["word"] * 60), truncation=False, max_length=35).input_ids
    assert ids.shape == (1, 62)


def test_bad_arguments(ours):
    with pytest.raises(ValueError, match="padding"):
        ours("x", padding=True)
    with pytest.raises(ValueError, match="return_tensors"):
        ours("x", return_tensors="np")


def test_caption_prompt_ids(ours):
    """Official captioning prompt: "a picture of " with [CLS] replaced by [DEC] is
    [30522, 1037, 3861, 1997] (its 4 positions are masked out of the LM loss)."""
    ids = ours("a picture of ").input_ids[0]
    ids[0] = ours.bos_token_id
    assert ids.tolist() == [30522, 1037, 3861, 1997, 102]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("cleanup", [True, False])
def test_decode_equals_hf(ours, hf, skip, cleanup):
    ids = ours(SENTENCES, padding="max_length", max_length=35).input_ids
    ids[:, 0] = ours.bos_token_id  # captioner outputs start with [DEC]
    got = ours.batch_decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=cleanup)
    ref = hf.batch_decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=cleanup)
    assert got == ref
    assert ours.decode(ids[1], skip, cleanup) == ref[1]
    assert ours.decode(ids[1].tolist(), skip, cleanup) == ref[1]


def test_decode_round_trip(ours):
    text = "a man's dog, isn't it sitting on a bench?"
    assert ours.decode(ours(text).input_ids[0]) == text
    assert (
        ours.decode(ours(text).input_ids[0], clean_up_tokenization_spaces=False)
        == "a man ' s dog, isn ' t it sitting on a bench?"
    )


@pytest.mark.parametrize("drop_tokenizer_json", [False, True])
def test_save_pretrained_loads_in_transformers(ours, tmp_path, drop_tokenizer_json):
    files = ours.save_pretrained(tmp_path)
    assert {f.name for f in files} == {"vocab.txt", "tokenizer.json", "tokenizer_config.json"}
    assert len((tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()) == 30522
    if drop_tokenizer_json:  # the slow-tokenizer route: vocab.txt + config only
        (tmp_path / "tokenizer.json").unlink()
    loaded = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    assert len(loaded) == 30524
    assert loaded.bos_token_id == 30522 and loaded.convert_tokens_to_ids("[ENC]") == 30523
    ref = loaded(
        SENTENCES, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    assert torch.equal(ours(SENTENCES, padding="max_length").input_ids, ref["input_ids"])
    assert tokenizer(tmp_path).vocab_size == 30524  # and our own loader reads the directory


def test_vocab_lookup_order(tmp_path, monkeypatch):
    pkg = packaged_vocab()
    copy = tmp_path / "v" / "vocab.txt"
    copy.parent.mkdir()
    shutil.copy(pkg, copy)
    monkeypatch.delenv("BLIP_FAST_VOCAB", raising=False)
    assert find_vocab() == pkg
    monkeypatch.setenv("BLIP_FAST_VOCAB", str(copy.parent))
    assert find_vocab() == copy
    assert find_vocab(pkg) == pkg  # explicit argument beats the env var


def test_bad_explicit_path_names_it(tmp_path, monkeypatch):
    bad = tmp_path / "nowhere" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="vocab argument") as err:
        tokenizer(bad)
    assert str(bad) in str(err.value)
    monkeypatch.setenv("BLIP_FAST_VOCAB", str(tmp_path))  # a directory without vocab.txt
    with pytest.raises(FileNotFoundError, match="BLIP_FAST_VOCAB") as err:
        find_vocab()
    assert str(tmp_path / "vocab.txt") in str(err.value)


def test_not_a_bert_vocab(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"not a BERT vocab.*\[CLS\]"):
        BlipTokenizer(tmp_path / "vocab.txt")
