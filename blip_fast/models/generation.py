"""Decoding for the image-grounded decoder: beam search, greedy and nucleus sampling, with a
KV cache (self-attention K/V grow by one token per step; image K/V are computed once).

Beam search follows HuggingFace ``transformers`` 5.x ``_beam_search`` step for step (top 2K
continuations, finished hypotheses scored by sum log-prob / generated_length^length_penalty,
the same early-stop heuristic), so tokens equal ``BlipForConditionalGeneration.generate``.
Official BLIP ran transformers 4.15, whose scorer divided by the full length including the
prompt; with ties of finished hypotheses of different lengths the two can pick differently.
"""

import torch
import torch.nn.functional as F

__all__ = ["beam_search", "sample"]

_NEG = -1.0e9


class _Stepper:
    """Runs the decoder on new tokens, keeping one cache dict per layer."""

    def __init__(self, decoder, image_embeds):
        self.decoder, self.image_embeds = decoder, image_embeds
        self.cache = [dict() for _ in decoder.bert.encoder.layer]
        self.length = 0

    def __call__(self, tokens):  # (N, n) new tokens -> (N, V) fp32 logits of the last one
        self.length += tokens.shape[1]
        mask = tokens.new_ones(tokens.shape[0], self.length)
        logits = self.decoder(tokens, mask, self.image_embeds, cache=self.cache)
        return logits[:, -1].float()

    def reorder(self, index):  # (N,) rows of the new batch
        for c in self.cache:
            c["self_k"], c["self_v"] = c["self_k"][index], c["self_v"][index]


def _process(scores, seqs, min_length: int, eos: int, repetition_penalty: float):
    """HF's MinLength (eos forbidden while len < min_length) and RepetitionPenalty processors.
    scores: (N, V); seqs: (N, cur) tokens so far, prompt included."""
    if repetition_penalty != 1.0:
        seen = torch.gather(scores, 1, seqs)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, seqs, seen)
    if seqs.shape[1] < min_length:
        scores = scores.clone()
        scores[:, eos] = -float("inf")
    return scores


def _gather(x, index):  # x (B, K, ...), index (B, J) -> (B, J, ...)
    return torch.gather(
        x, 1, index.view(*index.shape, *([1] * (x.ndim - 2))).expand(*index.shape, *x.shape[2:])
    )


@torch.no_grad()
def beam_search(
    decoder,
    image_embeds,
    prompt_ids,
    num_beams=3,
    max_length=20,
    min_length=5,
    eos=102,
    repetition_penalty=1.0,
    length_penalty=1.0,
):
    """image_embeds (B, N, W), prompt_ids (B, P) -> list of B token lists (prompt included,
    ending with eos unless max_length was reached)."""
    B, P = prompt_ids.shape
    K = num_beams
    stepper = _Stepper(decoder, image_embeds.repeat_interleave(K, dim=0))
    running = prompt_ids.new_full((B, K, max_length), eos)
    running[:, :, :P] = prompt_ids[:, None]
    finished = running.clone()
    run_scores = torch.zeros(B, K, device=prompt_ids.device)
    run_scores[:, 1:] = _NEG
    fin_scores = torch.full((B, K), _NEG, device=prompt_ids.device)
    is_fin = torch.zeros(B, K, dtype=torch.bool, device=prompt_ids.device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=prompt_ids.device)
    top_k_mask = torch.arange(2 * K, device=prompt_ids.device) < K
    tokens, cur = running[:, :, :P].reshape(B * K, P), P
    while True:
        logp = F.log_softmax(stepper(tokens), dim=-1)
        logp = _process(
            logp, running[:, :, :cur].reshape(B * K, cur), min_length, eos, repetition_penalty
        )
        V = logp.shape[-1]
        logp = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_lp, top_idx = torch.topk(logp, 2 * K)
        src_beam, tok = top_idx // V, top_idx % V
        top_seqs = _gather(running, src_beam)
        top_seqs[:, :, cur] = tok
        hits = (tok == eos) | (cur + 1 >= max_length)
        # Next running beams: the best K continuations that did not stop.
        keep = torch.topk(top_lp + hits.float() * _NEG, K).indices
        running, run_scores = _gather(top_seqs, keep), _gather(top_lp + hits.float() * _NEG, keep)
        beam_rows = _gather(src_beam, keep) + torch.arange(B, device=tok.device)[:, None] * K
        # Finished hypotheses: stopped among the top K, scored per generated token.
        just = hits & top_k_mask
        scored = (
            top_lp / ((cur + 1 - P) ** length_penalty)
            + (~can_improve).float() * _NEG
            + (~just).float() * _NEG
        )
        best = torch.topk(torch.cat([fin_scores, scored], 1), K).indices
        finished = _gather(torch.cat([finished, top_seqs], 1), best)
        fin_scores = _gather(torch.cat([fin_scores, scored], 1), best)
        is_fin = _gather(torch.cat([is_fin, just], 1), best)
        cur += 1
        best_running = run_scores[:, :1] / ((cur - P) ** length_penalty)
        worst_fin = torch.where(is_fin, fin_scores.min(1, keepdim=True).values, _NEG)
        can_improve = can_improve & (best_running > worst_fin).any(-1, keepdim=True)
        if not can_improve.any() or hits.all() or cur >= max_length:
            break
        stepper.reorder(beam_rows.view(-1))
        tokens = running[:, :, cur - 1].reshape(B * K, 1)
    return [_trim(finished[b, 0], P, eos) for b in range(B)]


@torch.no_grad()
def sample(
    decoder,
    image_embeds,
    prompt_ids,
    max_length=20,
    min_length=5,
    eos=102,
    pad=0,
    do_sample=False,
    top_p=0.9,
    top_k=50,
    repetition_penalty=1.0,
    generator=None,
):
    """Greedy (``do_sample=False``) or nucleus sampling as HF ``_sample``: processors on the
    logits, then (sampling) top-k 50 and top-p warpers, multinomial draw; finished rows get pad.
    image_embeds (B, N, W), prompt_ids (B, P) -> list of B token lists."""
    B, P = prompt_ids.shape
    stepper = _Stepper(decoder, image_embeds)
    seqs, tokens = prompt_ids, prompt_ids
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    while seqs.shape[1] < max_length and not done.all():
        scores = _process(stepper(tokens), seqs, min_length, eos, repetition_penalty)
        if do_sample:
            scores = _top_p(_top_k(scores, top_k), top_p)
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        done = done | (nxt == eos)
        tokens = nxt[:, None]
        seqs = torch.cat([seqs, tokens], 1)
    return [_trim(s, P, eos) for s in seqs]


def _top_k(scores, k: int):
    kth = torch.topk(scores, min(k, scores.shape[-1])).values[:, -1:]
    return scores.masked_fill(scores < kth, -float("inf"))


def _top_p(scores, p: float):
    """Keep the smallest set of tokens whose probability reaches p (HF TopPLogitsWarper)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - p)
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def _trim(seq, prompt_len: int, eos: int) -> list[int]:
    seq = seq.tolist()
    for i in range(prompt_len, len(seq)):
        if seq[i] == eos:
            return seq[: i + 1]
    return seq
