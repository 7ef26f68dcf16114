"""BLIP captioning model (official ``BLIP_Decoder``): ViT + image-grounded decoder with the
prompt "a picture of "; ``generate`` decodes with beam search or nucleus sampling."""

import torch
from torch import nn

from blip_fast.models import generation
from blip_fast.models.blip_base import backend_map
from blip_fast.models.configs import BlipConfig
from blip_fast.models.med import BertLMHeadModel
from blip_fast.models.vit import VisionTransformer

BOS_TOKEN_ID, SEP_TOKEN_ID, PAD_TOKEN_ID = 30522, 102, 0


class BlipCaption(nn.Module):
    def __init__(self, cfg: BlipConfig, backend: str | dict | None = None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.backends = backend_map(backend)
        self.visual_encoder = VisionTransformer(cfg.vision, self.backends.get("attention"))
        self.text_decoder = BertLMHeadModel(cfg.text, cfg.vision.width, self.backends)
        self._tokenizer = tokenizer

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
    ) -> list[list[int]]:
        """Token ids (prompt included) per image; see ``generate``."""
        image_embeds = self.visual_encoder(pixels)
        prompt = self.prompt_ids(pixels.shape[0], pixels.device)
        decoder = self.text_decoder
        if sample:
            return generation.sample(
                decoder,
                image_embeds,
                prompt,
                max_length,
                min_length,
                SEP_TOKEN_ID,
                PAD_TOKEN_ID,
                do_sample=True,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                generator=generator,
            )
        if num_beams == 1:
            return generation.sample(
                decoder,
                image_embeds,
                prompt,
                max_length,
                min_length,
                SEP_TOKEN_ID,
                PAD_TOKEN_ID,
                repetition_penalty=repetition_penalty,
            )
        return generation.beam_search(
            decoder,
            image_embeds,
            prompt,
            num_beams,
            max_length,
            min_length,
            SEP_TOKEN_ID,
            repetition_penalty,
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
    ) -> list[str]:
        """Captions for pixels (B, 3, S, S): beam search (3 beams, lengths counted with the
        prompt, max 20, min 5) or, with ``sample=True``, nucleus sampling (top_p 0.9; official
        CapFilt passes repetition_penalty=1.1). The prompt is stripped from each caption."""
        ids = self.generate_ids(
            pixels, sample, num_beams, max_length, min_length, top_p, repetition_penalty, generator
        )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [t[len(self.cfg.prompt) :] for t in texts]
