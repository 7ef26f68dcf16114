import pytest
import torch

from blip_fast import create_model, tokenizer
from blip_fast.data import RetrievalEvalDataset, make_synthetic, test_transform
from blip_fast.eval.retrieval import encode_images, encode_texts, evaluate, reference_scores


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    paths = make_synthetic(
        tmp_path_factory.mktemp("syn"),
        n_train_images=4,
        n_test_images=6,
        n_val_images=2,
        image_size=64,
        seed=0,
    )
    model = create_model("retrieval", "blip_tiny", backend="reference").eval()
    ds = RetrievalEvalDataset(paths["test"], paths["image_root"], test_transform(64))
    return model, ds


def test_reference_scores_follow_official_procedure(setup):
    model, ds = setup
    tok = tokenizer()
    t_embed, ids, mask = encode_texts(model, tok, ds.text)
    feats, i_embed = encode_images(model, torch.utils.data.DataLoader(ds, batch_size=4))
    assert ids.shape == (30, 35) and (ids[:, 0] == 101).all()
    k = 4
    s_i2t, s_t2i = reference_scores(model, feats, i_embed, t_embed, ids, mask, k)
    sims = i_embed @ t_embed.T
    assert ((s_i2t != -100).sum(1) == k).all() and ((s_t2i != -100).sum(1) == k).all()
    i, topk = 2, sims[2].topk(k).indices
    with torch.no_grad():
        enc = ids[topk].clone()
        enc[:, 0] = 30523
        out = model.text_encoder(
            enc, mask[topk], feats[i : i + 1].expand(k, -1, -1), mode="multimodal"
        )
        want = model.itm_head(out[:, 0])[:, 1] + sims[i, topk]
    torch.testing.assert_close(s_i2t[i, topk], want, rtol=1e-5, atol=1e-5)


def test_k_larger_than_gallery_and_metric_keys(setup):
    model, ds = setup
    res = evaluate(model, ds, tokenizer(), k_test=1000)
    assert res["pairs_scored"] == 6 * 30 + 30 * 6
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert 0.0 <= res[key] <= 100.0
    # with k >= gallery every image is reranked for every text: R@10 over 6 images is 100
    assert res["img_r10"] == 100.0


def test_fast_encodings_equal_the_official_batches(setup):
    """Length-sorted, trimmed batches (4 texts each, so the sort crosses batches) on prepacked
    encoders give every text and image the official features, in dataset order."""
    model, ds = setup
    fast_model = create_model("retrieval", "blip_tiny").eval()  # automatic (packable) backends
    fast_model.load_state_dict(model.state_dict())
    tok = tokenizer()
    lengths = tok(ds.text, padding="longest")["attention_mask"].sum(1)
    assert lengths.unique().numel() > 3  # the sort has something to reorder
    want_t, want_ids, want_mask = encode_texts(model, tok, ds.text, batch_size=4)
    got_t, ids, mask = encode_texts(fast_model, tok, ds.text, batch_size=4, mode="fast")
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-6)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    want_f, want_i = encode_images(model, loader)
    got_f, got_i = encode_images(fast_model, loader, mode="fast")
    torch.testing.assert_close(got_f, want_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_i, want_i, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encode", ["texts", "images"])
def test_an_unknown_encoding_mode_is_an_error(setup, encode):
    model, ds = setup
    with pytest.raises(ValueError, match="mode must be one of .* got 'fsat'"):
        if encode == "texts":
            encode_texts(model, tokenizer(), ds.text, mode="fsat")
        else:
            encode_images(model, torch.utils.data.DataLoader(ds, batch_size=4), mode="fsat")
