"""BLIP visual question answering (official ``BLIP_VQA``): ViT + image-grounded question encoder
([ENC] first, cross-attending to the image) + a separate answer decoder ([DEC] first, its own
weights, cross-attending to the question states under the question's padding mask).

Training: ``loss`` (every (question, answer) pair is a decoder row; ``token_loss`` takes them
tokenised). Inference: ``rank`` picks each question's answer from a closed list (official
``rank_answer``, in ``mode="reference"`` as official computes it or in ``mode="fast"``,
``fast_candidate_scores``), ``generate`` decodes free text with beam search. Questions arrive
normalised (``blip_fast.text.pre_question``).
"""

import torch
from torch import nn

from blip_fast import ops
from blip_fast.models import generation
from blip_fast.models.blip_base import backend_map
from blip_fast.models.configs import BlipConfig
from blip_fast.models.med import BertLMHeadModel, BertModel
from blip_fast.models.vit import VisionTransformer

__all__ = [
    "BlipVQA",
    "best_answers",
    "fast_candidate_scores",
    "tokenize_answers",
    "tokenize_questions",
    "top_answers",
]

ENC_TOKEN_ID, BOS_TOKEN_ID, SEP_TOKEN_ID, PAD_TOKEN_ID = 30523, 30522, 102, 0
QUESTION_MAX_TOKENS = 35
RANK_MODES = ("fast", "reference")
# Candidate rows per decoder pass of the fast ranker (rows of one question length and one
# answer length).
FAST_RANK_ROWS = 512


class BlipVQA(nn.Module):
    def __init__(self, cfg: BlipConfig, backend: str | dict | None = None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.backends = backend_map(backend)
        self.visual_encoder = VisionTransformer(cfg.vision, self.backends.get("attention"))
        self.text_encoder = BertModel(cfg.text, cfg.vision.width, self.backends)
        # the official decoder config keeps med_config's encoder width: the text width
        self.text_decoder = BertLMHeadModel(cfg.text, cfg.text.hidden_size, self.backends)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from blip_fast.tokenization import tokenizer

            self._tokenizer = tokenizer()
        return self._tokenizer

    def tokenize_questions(self, questions: list[str], device):
        """ids, mask (B, Lq): see ``tokenize_questions``."""
        return tokenize_questions(self.tokenizer, questions, device)

    def tokenize_answers(self, answers: list[str], device):
        """ids, mask (A, La): see ``tokenize_answers``."""
        return tokenize_answers(self.tokenizer, answers, device)

    def encode_questions(self, pixels, ids, mask):
        """pixels (B, 3, S, S), question ids / mask (B, Lq) -> question states (B, Lq, H)."""
        image_embeds = self.visual_encoder(pixels)
        return self.text_encoder(ids, mask, image_embeds, mode="multimodal")

    def answer_losses(self, question_states, question_mask, answer_ids, answer_mask):
        """Per answer row, the summed label-smoothed cross-entropy of its tokens after [DEC]
        ([SEP] included, padding ignored): the official decoder loss with reduction 'none'.
        question_states (R, Lq, H) and question_mask (R, Lq) of each row's question; answer
        ids / mask (R, La) -> (R,)."""
        hidden = self.text_decoder.bert(
            answer_ids, answer_mask, question_states, question_mask.bool(), "decoder"
        )
        labels = answer_ids.masked_fill(answer_ids == PAD_TOKEN_ID, -100)
        return (
            self._token_losses(hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            .view(answer_ids.shape[0], -1)
            .sum(1)
        )

    def _token_losses(self, hidden, labels):  # (T, H), (T,) -> (T,), 0 where labels == -100
        head = self.text_decoder.cls.predictions
        return ops.lm_head_loss(
            head.transform(hidden),
            head.decoder.weight,
            head.bias,
            labels,
            self.cfg.label_smoothing,
            reduction="none",
            backend=self.backends.get("lm_head_loss"),
        )

    def loss(self, pixels, questions: list[str], answers: list[str], n, weights):
        """The official training loss: question b has answers ``n[b]`` of ``answers`` (in
        order) with ``weights`` (sum(n),); loss = sum(weight * answer loss) / batch size."""
        B, n = pixels.shape[0], torch.as_tensor(n, device=pixels.device)
        if len(questions) != B or n.shape != (B,) or int(n.sum()) != len(answers):
            raise ValueError(
                f"VQA loss: {B} images, {len(questions)} questions, answer counts n of shape "
                f"{tuple(n.shape)} summing to {int(n.sum())}, {len(answers)} answers: need one "
                f"question and one count per image, and sum(n) answers"
            )
        if weights.shape != (len(answers),):
            raise ValueError(
                f"VQA loss: weights {tuple(weights.shape)} must be ({len(answers)},): one per "
                f"answer"
            )
        q_ids, q_mask = self.tokenize_questions(questions, pixels.device)
        a_ids, a_mask = self.tokenize_answers(answers, pixels.device)
        return self.token_loss(pixels, q_ids, q_mask, a_ids, a_mask, n, weights)

    def token_loss(self, pixels, question_ids, question_mask, answer_ids, answer_mask, n, weights):
        """``loss`` of tokenised questions (B, Lq) and answers (sum(n), La), ``n`` (B,) int64
        on the device: what the training step runs. The answer rows' count gives
        ``repeat_interleave`` its output size, so the host never waits for ``n``."""
        states = self.encode_questions(pixels, question_ids, question_mask)
        rows = answer_ids.shape[0]
        losses = self.answer_losses(
            states.repeat_interleave(n, 0, output_size=rows),
            question_mask.repeat_interleave(n, 0, output_size=rows),
            answer_ids,
            answer_mask,
        )
        return (weights * losses).sum() / pixels.shape[0]

    @torch.no_grad()
    def first_token_logits(self, question_states, question_mask, cache=None):
        """One decoder step from [DEC]: (N, V) logits of every question's first answer token.
        ``cache`` (one dict per layer) receives the step's keys / values."""
        start = question_mask.new_full((question_states.shape[0], 1), BOS_TOKEN_ID)
        logits = self.text_decoder(
            start, torch.ones_like(start), question_states, question_mask.bool(), cache
        )
        return logits[:, 0]

    @torch.no_grad()
    def candidate_scores(self, question_states, question_mask, answer_ids, answer_mask, k_test):
        """The official ``rank_answer`` scoring: candidates (N, k) = ``top_answers``, scores
        (N, k) = minus each candidate's ``answer_losses``, the candidate rows tiled with
        copies of their question's states."""
        candidates = top_answers(
            self.first_token_logits(question_states, question_mask), answer_ids, k_test
        )
        N, k = candidates.shape
        rows = candidates.flatten()
        losses = self.answer_losses(
            question_states.repeat_interleave(k, 0),
            question_mask.repeat_interleave(k, 0),
            answer_ids[rows],
            answer_mask[rows],
        )
        return candidates, -losses.view(N, k)

    @torch.no_grad()
    def rank(self, pixels, questions: list[str], answer_list: list[str], k_test=128, mode="fast"):
        """Index into ``answer_list`` of each question's answer (``rank_answers``)."""
        q_ids, q_mask = self.tokenize_questions(questions, pixels.device)
        a_ids, a_mask = self.tokenize_answers(answer_list, pixels.device)
        states = self.encode_questions(pixels, q_ids, q_mask)
        return self.rank_answers(states, q_mask, a_ids, a_mask, k_test, mode).tolist()

    @torch.no_grad()
    def rank_answers(self, question_states, question_mask, answer_ids, answer_mask, k_test, mode):
        """(N,) answer index per question: of the k_test answers whose first token is likeliest
        after [DEC], the one of highest score (minus the summed label-smoothed token
        cross-entropy); a list shorter than k_test is ranked whole. ``mode``: "fast"
        (``fast_candidate_scores``) or "reference" (``candidate_scores``)."""
        if mode not in RANK_MODES:
            raise ValueError(f"mode must be one of {RANK_MODES}, got {mode!r}")
        score = self.candidate_scores if mode == "reference" else self.fast_candidate_scores
        candidates, scores = score(question_states, question_mask, answer_ids, answer_mask, k_test)
        return best_answers(candidates, scores)

    def fast_candidate_scores(
        self, question_states, question_mask, answer_ids, answer_mask, k_test
    ):
        """``candidate_scores`` with less work: see ``fast_candidate_scores``."""
        return fast_candidate_scores(
            self, question_states, question_mask, answer_ids, answer_mask, k_test
        )

    @torch.no_grad()
    def generate(self, pixels, questions: list[str], num_beams=3, max_length=10, min_length=1):
        """Free-text answers by beam search from [DEC] (lengths count [DEC]; eos [SEP]). As
        official, the decoder attends to every question position, padding included."""
        q_ids, q_mask = self.tokenize_questions(questions, pixels.device)
        states = self.encode_questions(pixels, q_ids, q_mask)
        start = q_ids.new_full((states.shape[0], 1), BOS_TOKEN_ID)
        ids = generation.beam_search(
            self.text_decoder, states, start, num_beams, max_length, min_length, SEP_TOKEN_ID
        )
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def tokenize_questions(tokenizer, questions: list[str], device):
    """ids, mask (B, Lq): padded to the longest, at most 35 tokens, [ENC] first."""
    tok = tokenizer(
        questions, padding="longest", truncation=True, max_length=QUESTION_MAX_TOKENS
    ).to(device)
    ids = tok["input_ids"].clone()
    ids[:, 0] = ENC_TOKEN_ID
    return ids, tok["attention_mask"]


def tokenize_answers(tokenizer, answers: list[str], device):
    """ids, mask (A, La): padded to the longest, untruncated, [DEC] first."""
    tok = tokenizer(answers, padding="longest", truncation=False).to(device)
    ids = tok["input_ids"].clone()
    if ids.shape[0]:
        ids[:, 0] = BOS_TOKEN_ID
    return ids, tok["attention_mask"]


def top_answers(first_logits, answer_ids, k_test: int):
    """(N, k) indices of the k = min(k_test, A) answers of ``answer_ids`` (A, La) whose first
    token (after [DEC]) is likeliest under ``first_logits`` (N, V), by the official calls
    (softmax, index_select, topk): answers that share a first token tie exactly and are
    ordered as official."""
    if answer_ids.dim() != 2 or answer_ids.shape[0] == 0 or answer_ids.shape[1] < 2:
        raise ValueError(
            f"answer list is empty or untokenised: answer ids {tuple(answer_ids.shape)} must "
            f"be (A >= 1, [DEC] + tokens + [SEP])"
        )
    if k_test < 1:
        raise ValueError(f"k_test must be >= 1, got {k_test}")
    k = min(k_test, answer_ids.shape[0])
    probs = first_logits.softmax(dim=1).index_select(1, answer_ids[:, 1])
    return probs.topk(k, dim=1).indices


def best_answers(candidates, scores):
    """(N,) the candidate of highest score per row (the first of equal ones, as argmax)."""
    return candidates.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)


@torch.no_grad()
def fast_candidate_scores(model, question_states, question_mask, answer_ids, answer_mask, k_test):
    """``model.candidate_scores``'s candidates and scores (equal up to float rounding), with
    less work. The first step's logits choose the candidates by the same calls (identical
    ties) and give every candidate's first-token loss: a candidate that is one token + [SEP]
    needs no more. The others run from their first token to their last before [SEP], reading
    [DEC]'s self-attention keys / values from the first step, nothing padded, and the LM head
    runs only at positions whose next token they predict.
    Cross-attention keys / values of the question states are projected once per question
    and layer, and candidate rows read them by question index (``ImageKV``, gathered
    cross-attention). That path has no key padding mask, so questions are grouped by token
    length and their states cut to it: a padded key's official weight, exp(-10000 + s), is
    exactly 0 in fp32, so dropping it is exact. Rows of all questions of one length are batched
    together, in passes of one answer length (at most ``FAST_RANK_ROWS`` rows)."""
    first_step = [{} for _ in model.text_decoder.bert.encoder.layer]
    logits = model.first_token_logits(question_states, question_mask, first_step)
    candidates = top_answers(logits, answer_ids, k_test)
    N, k = candidates.shape
    q_len = _prefix_lengths(question_mask, "question_mask")
    eps = model.cfg.label_smoothing
    logp = logits.float().log_softmax(1)  # label-smoothed CE = -(1-eps) logp[y] - eps mean(logp)
    first = answer_ids[candidates, 1]
    losses = -(1 - eps) * logp.gather(1, first) - eps * logp.mean(1, keepdim=True)
    losses = losses.flatten()  # (N k,), row r: question r // k, answer candidates[r]
    answer = candidates.flatten()
    question = torch.arange(N, device=answer.device).repeat_interleave(k)
    inputs = _prefix_lengths(answer_mask, "answer_mask")[answer] - 1  # [DEC] .. before [SEP]
    bert = model.text_decoder.bert
    for length in q_len.unique().tolist():
        in_group = q_len == length
        rows = (in_group[question] & (inputs > 1)).nonzero().squeeze(1)
        if len(rows) == 0:  # every candidate is one token + [SEP]: the first step scored it
            continue
        rows = rows[inputs[rows].argsort(stable=True)]
        local = torch.cumsum(in_group, 0) - 1  # question -> its row in the group's K / V
        kv = bert.image_kv(question_states[in_group, :length])
        runs = torch.unique_consecutive(inputs[rows], return_counts=True)[1].tolist()
        for run in rows.split(runs):  # rows of one answer length: nothing is padded
            for chunk in run.split(FAST_RANK_ROWS):
                L = int(inputs[chunk[0]])
                ids = answer_ids[answer[chunk], : L + 1]
                # [DEC]'s self-attention keys / values are its question's, from the first step
                cache = [
                    {"self_k": c["self_k"][question[chunk]], "self_v": c["self_v"][question[chunk]]}
                    for c in first_step
                ]
                hidden = bert(  # positions 1 .. L - 1, predicting tokens 2 .. L
                    ids[:, 1:L],
                    answer_mask[answer[chunk], :L],
                    mode="decoder",
                    cache=cache,
                    image_kv=kv.at(local[question[chunk]]),
                )
                token_losses = model._token_losses(hidden.flatten(0, 1), ids[:, 2:].flatten())
                losses.index_add_(0, chunk.repeat_interleave(L - 1), token_losses.to(losses.dtype))
    return candidates, -losses.view(N, k)


def _prefix_lengths(mask, name: str):
    """(B,) lengths of a right-padded 0/1 mask (B, L); any other pattern is an error."""
    lengths = mask.sum(1)
    if not torch.equal(
        mask.bool(), torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
    ):
        raise ValueError(f"{name} {tuple(mask.shape)} must be right-padded: ones, then zeros")
    return lengths
