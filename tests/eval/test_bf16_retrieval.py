"""bf16 retrieval evaluation on the CPU: the candidates are exactly the fp32 run's (chosen by
fp32 features and similarities), only their ITM scores move, by bf16 rounding; a CPU without
native bf16 runs fp32 and says so."""

import copy
import logging

import pytest
import torch

from blip_fast import create_model, tokenizer
from blip_fast.data import RetrievalEvalDataset, make_synthetic, test_transform
from blip_fast.eval import retrieval
from blip_fast.eval.metrics import KEYS
from blip_fast.ops.linear import native_bf16

needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="CPU without AMX / AVX512-BF16")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    paths = make_synthetic(
        tmp_path_factory.mktemp("syn"),
        n_train_images=2,
        n_test_images=8,
        n_val_images=1,
        image_size=64,
        seed=0,
    )
    model = create_model("retrieval", "blip_tiny").eval()  # automatic: oneDNN GEMMs, C++ ops
    eager = create_model("retrieval", "blip_tiny", backend="reference").eval()
    eager.load_state_dict(model.state_dict())
    ds = RetrievalEvalDataset(paths["test"], paths["image_root"], test_transform(64))
    return model, eager, ds


def _evaluate(model, ds, precision, mode="fast", k=3):
    return retrieval.evaluate(
        model, ds, tokenizer(), k_test=k, mode=mode, precision=precision, return_scores=True
    )


@torch.no_grad()
def _all_bf16_itm_error(eager, ds) -> float:
    """Largest change of the official ITM logit over every (image, text) pair of ``ds`` when
    the official model runs entirely in bf16 (``model.to(torch.bfloat16)``, as loading it in
    bf16 does): the floor for a reranker whose activations stay in bf16."""
    low = copy.deepcopy(eager).to(torch.bfloat16)
    pixels = torch.stack([ds[i][0] for i in range(len(ds.image))])
    tok = tokenizer()(ds.text, padding="longest", truncation=True, max_length=35)
    text, feats = (tok["input_ids"], tok["attention_mask"]), eager.image_embeds(pixels)
    worst = 0.0
    for image in feats[:, None]:  # every text against one image, (1, N, W) broadcast
        exact = eager.itm_logits(*text, image)[:, 1]
        got = low.itm_logits(*text, image.bfloat16())[:, 1]
        worst = max(worst, (got.float() - exact).abs().max().item())
    return worst


@needs_bf16
@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_bf16_scores_the_fp32_candidates(setup, mode):
    """Same candidates; scores within FlashAttention's low-precision rule: error against fp32
    at most twice that of the official math in bf16 plus 1e-3. The official loop runs under
    autocast, so its floor is that loop in eager bf16 autocast (every op on its reference
    backend); the fast reranker keeps its activations in bf16 (an all-bf16 copy of the text
    encoder), so its floor is the official ITM of the model cast to bf16. blip_tiny's
    random-weight scores are small (|score| <= 0.21), so bf16's rounding of the hidden states
    the ITM head reads is several percent of them."""
    model, eager, ds = setup
    fp32, bf16 = _evaluate(model, ds, "fp32", mode), _evaluate(model, ds, "bf16", mode)
    if mode == "fast":
        floor = {key: _all_bf16_itm_error(eager, ds) for key in ("scores_i2t", "scores_t2i")}
    else:
        ref = _evaluate(eager, ds, "bf16", "reference")
        floor = {key: (ref[key] - fp32[key]).abs().max().item() for key in ref if "scores" in key}
    assert bf16["precision"] == "bf16" and bf16["itm_pairs"] == fp32["itm_pairs"]
    for key in ("scores_i2t", "scores_t2i"):
        exact, got = fp32[key], bf16[key]
        chosen = exact != -100
        assert torch.equal(got != -100, chosen), f"{key}: bf16 scored other candidates"
        assert not torch.equal(got, exact)  # the reranker did run in bf16
        err = (got - exact).abs().max().item()
        assert err <= 2 * floor[key] + 1e-3, f"{key}: bf16 error {err:.3g}, floor {floor[key]:.3g}"


def test_bf16_without_native_bf16_runs_fp32(setup, monkeypatch, caplog):
    model, _, ds = setup
    monkeypatch.setattr(retrieval, "native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="blip_fast"):
        got = _evaluate(model, ds, "bf16")
    assert [r.getMessage() for r in caplog.records] == [
        "bf16 requested, but this CPU has neither AMX nor AVX512-BF16: running fp32"
    ]
    want = _evaluate(model, ds, "fp32")
    assert got["precision"] == "fp32"
    assert {k: got[k] for k in KEYS} == {k: want[k] for k in KEYS}
    torch.testing.assert_close(got["scores_i2t"], want["scores_i2t"], rtol=0, atol=0)
