import torch

from blip_fast.models import create_model
from blip_fast.models.generation import beam_search, sample


def _model():
    torch.manual_seed(1)
    m = create_model("caption", "blip_tiny", backend="reference").eval()
    with torch.no_grad():  # a peaked LM head so sequences end before max_length sometimes
        m.text_decoder.cls.predictions.bias[102] += 3.0
    return m


def test_greedy_equals_full_recompute_argmax():
    m = _model()
    img = m.visual_encoder(torch.randn(2, 3, 64, 64))
    prompt = m.prompt_ids(2, "cpu")
    got = sample(m.text_decoder, img, prompt, max_length=12, min_length=6)
    for b in range(2):
        seq = prompt[b : b + 1]
        while seq.shape[1] < 12:
            logits = m.text_decoder(seq, torch.ones_like(seq), img[b : b + 1])[0, -1]
            if seq.shape[1] < 6:
                logits[102] = -float("inf")
            nxt = int(logits.argmax())
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            if nxt == 102:
                break
        assert got[b] == seq[0].tolist()
        assert len(got[b]) >= 6


def test_beam_search_respects_lengths_and_prompt():
    m = _model()
    img = m.visual_encoder(torch.randn(3, 3, 64, 64))
    prompt = m.prompt_ids(3, "cpu")
    beams = beam_search(m.text_decoder, img, prompt, 3, 10, 5)
    assert len(beams) == 3
    for s in beams:
        assert s[:4] == prompt[0].tolist() and 5 <= len(s) <= 10
        assert 102 not in s[4:-1] and (s[-1] == 102 or len(s) == 10)


def test_generate_strips_prompt_and_sampling_is_seeded():
    m = _model()
    px = torch.randn(2, 3, 64, 64)
    caps = m.generate(px, num_beams=3, max_length=10, min_length=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    g = torch.Generator().manual_seed(3)
    a = m.generate_ids(px, sample=True, generator=g, repetition_penalty=1.1)
    g = torch.Generator().manual_seed(3)
    assert a == m.generate_ids(px, sample=True, generator=g, repetition_penalty=1.1)
