"""BLIP captioning model (official ``BLIP_Decoder``): ViT + image-grounded decoder with the
prompt "a picture of "; ``generate`` decodes with beam search or nucleus sampling, in fp32 or
bf16."""

import logging

import torch
from torch import nn

from blip_fast.models import generation
from blip_fast.models.blip_base import backend_map
from blip_fast.models.configs import BlipConfig
from blip_fast.models.med import BertLMHeadModel
from blip_fast.models.vit import VisionTransformer
from blip_fast.ops.linear import native_bf16, prepack_linears

BOS_TOKEN_ID, SEP_TOKEN_ID, PAD_TOKEN_ID = 30522, 102, 0
PRECISIONS = ("fp32", "bf16")
# bf16 on the CPU runs the decoder's layers in bf16 only where their multiply-adds per token are
# at least this share of the LM head's (hidden x vocab), whose projection is bf16 in any case.
# Measured on a 2-core Xeon (AMX), 3 beams, fp32 / bf16 layers / fp32 layers: the demo model's
# one 128-wide layer (share 0.06) 0.92 / 0.92 / 0.92 s for 200 images, its captions identical to
# fp32's for 90% of them with bf16 layers, 98% without; blip_small_demo (0.47), 100 images,
# 1.09 / 0.67 / 0.95 s; BERT-base (4.2), 12 images, 3.68 / 1.25 / 2.03 s.
BF16_LAYERS_MIN_SHARE = 0.25
log = logging.getLogger("blip_fast")


def decoder_layer_share(text) -> float:
    """Multiply-adds per token of the decoder's layers (self- and cross-attention projections,
    FFN) over its LM head's output projection, for a ``TextConfig``."""
    H, inner = text.hidden_size, text.intermediate_size
    return text.num_layers * (6 * H * H + 2 * H * inner) / (H * text.vocab_size)


class BlipCaption(nn.Module):
    def __init__(self, cfg: BlipConfig, backend: str | dict | None = None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.backends = backend_map(backend)
        self.visual_encoder = VisionTransformer(cfg.vision, self.backends.get("attention"))
        self.text_decoder = BertLMHeadModel(cfg.text, cfg.vision.width, self.backends)
        self._tokenizer = tokenizer
        self._bf16_modules = None  # (weights' fingerprint, packed ViT, packed decoder)
        self._bf16_fallback_logged = False

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from blip_fast.tokenization import tokenizer

            self._tokenizer = tokenizer()
        return self._tokenizer

    def prompt_ids(self, batch: int, device) -> torch.Tensor:
        """The prompt as the decoder sees it: [DEC] + prompt tokens, no [SEP]: (batch, P)."""
        ids = self.tokenizer(self.cfg.prompt, padding="longest")["input_ids"][:, :-1]
        ids[:, 0] = BOS_TOKEN_ID
        return ids.to(device).expand(batch, -1).contiguous()

    def _inference_modules(self, precision: str, device):
        """(visual encoder, decoder, compute dtype, fp32 layers) that ``precision`` runs on
        ``device``. bf16 on the CPU: copies with linear layers prepacked for oneDNN (bf16 GEMMs
        on AMX / AVX512-BF16, ``ops.prepack_linears``), rebuilt when a weight changed: an
        all-bf16 ViT (its activations, (images x tokens) rows, are too large to cast around
        every layer, as autocast does) and the decoder for autocast (a step's activations are a
        few rows, and its fp32 residual stream keeps near-tied beams in fp32's order), its
        layers in fp32 where they are a small share of a step (``BF16_LAYERS_MIN_SHARE``);
        without native bf16, fp32 (one log line per model). bf16 on CUDA: autocast alone."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp32":
            return self.visual_encoder, self.text_decoder, None, False
        if torch.device(device).type != "cpu":
            return self.visual_encoder, self.text_decoder, torch.bfloat16, False
        if not native_bf16():
            if not self._bf16_fallback_logged:
                log.warning(
                    "caption precision bf16: this CPU has neither AMX nor AVX512-BF16, "
                    "generating in fp32"
                )
                self._bf16_fallback_logged = True
            return self.visual_encoder, self.text_decoder, None, False
        # in-place updates (optimizer steps, load_state_dict) bump _version; .to() moves data
        fingerprint = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._bf16_modules is None or self._bf16_modules[0] != fingerprint:
            backend = self.backends.get("linear")
            self._bf16_modules = (
                fingerprint,
                self.visual_encoder.packed(backend, torch.bfloat16),
                prepack_linears(self.text_decoder, backend),
            )
        fp32_layers = decoder_layer_share(self.cfg.text) < BF16_LAYERS_MIN_SHARE
        return *self._bf16_modules[1:], torch.bfloat16, fp32_layers

    @torch.no_grad()
    def generate_ids(
        self,
        pixels,
        sample=False,
        num_beams=3,
        max_length=20,
        min_length=5,
        top_p=0.9,
        repetition_penalty=1.0,
        generator=None,
        precision="fp32",
    ) -> list[list[int]]:
        """Token ids (prompt included) per image; see ``generate``."""
        vit, decoder, dtype, fp32_layers = self._inference_modules(precision, pixels.device)
        vit_dtype = next(vit.parameters()).dtype
        if dtype is None or vit_dtype == dtype:
            image_embeds = vit(pixels.to(vit_dtype))
        else:
            with torch.autocast(pixels.device.type, dtype):
                image_embeds = vit(pixels)
        prompt = self.prompt_ids(pixels.shape[0], pixels.device)
        lengths = (max_length, min_length, SEP_TOKEN_ID)
        if sample or num_beams == 1:
            return generation.sample(
                decoder,
                image_embeds,
                prompt,
                *lengths,
                PAD_TOKEN_ID,
                do_sample=sample,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                generator=generator,
                compute_dtype=dtype,
                fp32_layers=fp32_layers,
            )
        return generation.beam_search(
            decoder,
            image_embeds,
            prompt,
            num_beams,
            *lengths,
            repetition_penalty,
            compute_dtype=dtype,
            fp32_layers=fp32_layers,
        )

    def generate(
        self,
        pixels,
        sample=False,
        num_beams=3,
        max_length=20,
        min_length=5,
        top_p=0.9,
        repetition_penalty=1.0,
        generator=None,
        precision="fp32",
    ) -> list[str]:
        """Captions for pixels (B, 3, S, S): beam search (3 beams, lengths counted with the
        prompt, max 20, min 5) or, with ``sample=True``, nucleus sampling (top_p 0.9; official
        CapFilt passes repetition_penalty=1.1). The prompt is stripped from each caption.
        ``precision``: "fp32" (as the caller runs: its autocast applies), or "bf16": on the
        CPU an all-bf16 copy of the ViT and the decoder under bf16 autocast (its layers in fp32
        where they weigh little beside the LM head, ``BF16_LAYERS_MIN_SHARE``), on prepacked
        weights (fp32 with a log line where the CPU lacks native bf16), on CUDA bf16 autocast;
        each beam's 16 largest logits are recomputed in fp32, and log-probabilities and beam
        scores stay fp32."""
        ids = self.generate_ids(
            pixels,
            sample,
            num_beams,
            max_length,
            min_length,
            top_p,
            repetition_penalty,
            generator,
            precision,
        )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [t[len(self.cfg.prompt) :] for t in texts]
