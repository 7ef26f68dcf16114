"""BlipVQA: the official key layout and checkpoints, parity with HuggingFace
``BlipForQuestionAnswering`` (question encoder, decoder logits, answer losses, beam search), the
fast ranker against the reference ranker, the training loss, and bad input.

transformers 5.x drops the decoder's ``encoder_attention_mask`` (``BlipTextSelfAttention``
overwrites the mask it is given with its own, unset, ``encoder_attention_mask``), so HF attends
to padded question positions in every decoder pass. Official BLIP masks them (except in
``generate``): masked parity is checked against HF on each question's states cut to its length,
which is what the mask means (a masked key's weight exp(-10000 + s) is exactly 0 in fp32)."""

from pathlib import Path

import pytest
import torch
import transformers
from test_parity_hf import hf_config, reinit, rel_err

from blip_fast import checkpoint
from blip_fast.models import BlipConfig, BlipVQA, convert, create_model
from blip_fast.models import blip_vqa as vqa
from blip_fast.models.configs import VisionConfig

SEP = 102
REL_TOL = 1e-5
OFFICIAL_KEYS = Path(__file__).resolve().parent / "official_keys"
QUESTIONS = [
    "what color is the cat?",
    "how many",
    "is this a dog in the park with a ball?",
    "where",
    "what is on the table?",
    "who",
]
# duplicates, shared first tokens, an empty answer, lengths 0 to 5 tokens
ANSWERS = ["yes", "no", "2", "red", "a red dog", "", "in the park", "yes", "tennis racket"]
ANSWERS += ["new york city", "red and white", "a", "two", "cat", "on the table", "nothing at all"]


@pytest.fixture(scope="module")
def hf_vqa():
    config = hf_config()
    config.text_config.label_smoothing = 0.1  # official; HF's default is 0
    # std 0.1 and a [SEP] bias of 2 (as the caption parity test): answers differ per question
    model = reinit(transformers.BlipForQuestionAnswering(config), 4, std=0.1)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[SEP] = 2.0
    return model


@pytest.fixture(scope="module")
def ours(hf_vqa, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_vqa")
    hf_vqa.save_pretrained(path)
    return checkpoint.load(path)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(len(QUESTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def encoded(ours, pixels):
    ids, mask = ours.tokenize_questions(QUESTIONS, "cpu")
    answer_ids, answer_mask = ours.tokenize_answers(ANSWERS, "cpu")
    with torch.no_grad():
        states = ours.encode_questions(pixels, ids, mask)
    return ids, mask, states, answer_ids, answer_mask


def read_tsv(name) -> dict:
    rows = (line.split("\t") for line in (OFFICIAL_KEYS / f"{name}.tsv").read_text().splitlines())
    return {key: shape for key, shape, *_ in rows}


def test_official_layout():
    """BLIP_VQA (ViT-B at 480 px): the retrieval model's ViT and text encoder (no pooler) and
    the caption model's decoder, nothing else."""
    cfg = BlipConfig(vision=VisionConfig.preset("base", image_size=480))
    with torch.device("meta"):
        got = {k: str(list(v.shape)) for k, v in create_model("vqa", cfg).state_dict().items()}
    retrieval, caption = read_tsv("BLIP_Retrieval"), read_tsv("BLIP_Decoder")
    want = {
        k: s for k, s in retrieval.items() if k.startswith(("visual_encoder.", "text_encoder."))
    }
    want |= {k: s for k, s in caption.items() if k.startswith("text_decoder.")}
    want["visual_encoder.pos_embed"] = "[1, 901, 768]"  # (480 / 16)^2 + 1 tokens
    assert got == want
    assert checkpoint.infer_task(got) == "vqa"


def test_official_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("vqa", "blip_tiny").eval()
    sd = model.state_dict()
    assert sd["text_decoder.cls.predictions.decoder.weight"] is not None
    torch.save({"model": sd}, tmp_path / "model_base_vqa.pth")  # as official, no config
    for path in (tmp_path / "model_base_vqa.pth", checkpoint.save(model, tmp_path / "ours.pth")):
        again = checkpoint.load(path)
        assert type(again) is BlipVQA and again.load_report.task == "vqa"
        assert not (again.load_report.missing or again.load_report.unexpected)
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())
    decoder = again.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


def test_hf_layout_and_save_load(ours, tmp_path):
    hf_sd = convert.official_to_hf(ours.state_dict())
    hf_cfg = transformers.BlipConfig.from_dict(convert.blip_to_hf_config(ours.cfg, "vqa"))
    with torch.device("meta"):
        want = transformers.BlipForQuestionAnswering(hf_cfg).state_dict()
    assert {k: v.shape for k, v in hf_sd.items()} == {k: v.shape for k, v in want.items()}
    out = checkpoint.save(ours, tmp_path / "hf", format="hf")
    hf = transformers.BlipForQuestionAnswering.from_pretrained(out)
    assert hf.config.architectures == ["BlipForQuestionAnswering"]
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in hf_sd.items())
    again = checkpoint.load(out)
    assert type(again) is BlipVQA
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_question_encoder_and_decoder_parity(hf_vqa, ours, pixels, encoded):
    ids, mask, states, answer_ids, answer_mask = encoded
    with torch.no_grad():
        image = hf_vqa.vision_model(pixel_values=pixels)[0]
        want = hf_vqa.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image)
        assert rel_err(states, want[0]) < REL_TOL
        rows = torch.arange(len(ANSWERS)) % len(QUESTIONS)  # answer a asks question a mod 6
        logits = ours.text_decoder(answer_ids, answer_mask, states[rows], mask[rows].bool())
        losses = ours.answer_losses(states[rows], mask[rows], answer_ids, answer_mask)
        for a, q in enumerate(rows.tolist()):
            n = int(mask[q].sum())
            hf = hf_vqa.text_decoder(
                input_ids=answer_ids[a : a + 1],
                attention_mask=answer_mask[a : a + 1],
                encoder_hidden_states=states[q : q + 1, :n],
                labels=answer_ids[a : a + 1].masked_fill(answer_ids[a : a + 1] == 0, -100),
                reduction="none",
            )
            assert rel_err(logits[a], hf.logits[0]) < REL_TOL, ANSWERS[a]
            assert rel_err(losses[a], hf.loss[0]) < REL_TOL, ANSWERS[a]


def test_generate_equals_hf(hf_vqa, ours, pixels, encoded):
    ids, mask = encoded[:2]
    want = hf_vqa.generate(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=mask,
        num_beams=3,
        max_length=10,
        min_length=1,
    )
    want = ours.tokenizer.batch_decode(want, skip_special_tokens=True)
    assert ours.generate(pixels, QUESTIONS) == want
    assert len(set(want)) > 1


@pytest.mark.parametrize("k_test", [1, 3, 7, len(ANSWERS), 128])
@pytest.mark.parametrize("rows_per_pass", [vqa.FAST_RANK_ROWS, 5])
def test_fast_rank_equals_reference(ours, encoded, k_test, rows_per_pass, monkeypatch):
    """Same candidates in the same order, scores within float rounding, same answers; small
    passes split question groups into several chunks."""
    monkeypatch.setattr(vqa, "FAST_RANK_ROWS", rows_per_pass)
    _, mask, states, answer_ids, answer_mask = encoded
    args = (states, mask, answer_ids, answer_mask, k_test)
    want_candidates, want = ours.candidate_scores(*args)
    candidates, got = ours.fast_candidate_scores(*args)
    assert candidates.shape == (len(QUESTIONS), min(k_test, len(ANSWERS)))
    assert torch.equal(candidates, want_candidates)
    assert rel_err(got, want) < REL_TOL
    best = ours.rank_answers(*args, mode="fast")
    assert torch.equal(best, ours.rank_answers(*args, mode="reference"))
    assert torch.equal(best, vqa.best_answers(want_candidates, want))


def test_rank_scores_are_official_answer_losses(hf_vqa, ours, encoded):
    """A reference score is minus HF's label-smoothed summed token loss of that answer."""
    _, mask, states, answer_ids, answer_mask = encoded
    candidates, scores = ours.candidate_scores(states, mask, answer_ids, answer_mask, 4)
    q, j = 1, 2
    a = int(candidates[q, j])
    hf = hf_vqa.text_decoder(
        input_ids=answer_ids[a : a + 1],
        attention_mask=answer_mask[a : a + 1],
        encoder_hidden_states=states[q : q + 1, : int(mask[q].sum())],
        labels=answer_ids[a : a + 1].masked_fill(answer_ids[a : a + 1] == 0, -100),
        reduction="none",
    )
    assert rel_err(-scores[q, j], hf.loss[0]) < REL_TOL


def test_rank_strings_and_short_list(ours, pixels, encoded):
    # random weights favour the shortest answers; among longer ones the questions differ
    longer = [a for a in ANSWERS if len(a.split()) >= 2]
    answers = ours.rank(pixels, QUESTIONS, longer, k_test=4)
    assert answers == ours.rank(pixels, QUESTIONS, longer, k_test=4, mode="reference")
    assert len(set(answers)) > 1
    # a list shorter than k_test is ranked whole
    _, mask, states = encoded[:3]
    a_ids, a_mask = ours.tokenize_answers(ANSWERS[:3], "cpu")
    candidates, scores = ours.candidate_scores(states, mask, a_ids, a_mask, 128)
    assert all(sorted(row) == [0, 1, 2] for row in candidates.tolist())
    best = vqa.best_answers(candidates, scores).tolist()
    assert ours.rank(pixels, QUESTIONS, ANSWERS[:3], k_test=128) == best


def test_loss_is_weighted_answer_losses_over_batch(ours, pixels, encoded):
    ids, mask, states = encoded[:3]
    answers, n = ["yes", "no", "2", "red", "a red dog", "", "cat"], [2, 1, 1, 1, 1, 1]
    weights = torch.tensor([0.7, 0.3, 1.0, 0.2, 0.5, 1.0, 0.4])
    loss = ours.loss(pixels, QUESTIONS, answers, n, weights)
    rows = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    a_ids, a_mask = ours.tokenize_answers(answers, "cpu")
    want = (weights * ours.answer_losses(states[rows], mask[rows], a_ids, a_mask)).sum() / 6
    assert rel_err(loss, want) < REL_TOL
    loss.backward()
    assert ours.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="sum\\(n\\) answers"):
        ours.loss(pixels, QUESTIONS, answers, [2, 1, 1, 1, 1], weights)
    with pytest.raises(ValueError, match="one per answer"):
        ours.loss(pixels, QUESTIONS, answers, n, weights[:3])


def test_bad_rank_input(ours, pixels, encoded):
    with pytest.raises(ValueError, match="answer list is empty"):
        ours.rank(pixels, QUESTIONS, [], k_test=4)
    with pytest.raises(ValueError, match="k_test must be >= 1"):
        ours.rank(pixels, QUESTIONS, ANSWERS, k_test=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        ours.rank(pixels, QUESTIONS, ANSWERS, mode="slow")
    _, mask, states, answer_ids, answer_mask = encoded
    holes = mask.clone()
    holes[0, 1] = 0
    with pytest.raises(ValueError, match="question_mask .* right-padded"):
        ours.fast_candidate_scores(states, holes, answer_ids, answer_mask, 4)
