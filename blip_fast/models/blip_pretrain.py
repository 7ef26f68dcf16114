"""BLIP pre-training model (official ``BLIP_Pretrain``): the retrieval trunk without idx
queue, plus the image-grounded decoder sharing all but self-attention with the text encoder."""

import torch
from torch import nn

from blip_fast.models.blip_base import MomentumMixin, backend_map, enqueue, init_queues, itm_head
from blip_fast.models.blip_retrieval import BlipITMMixin
from blip_fast.models.configs import BlipConfig
from blip_fast.models.med import BertLMHeadModel, BertModel, tie_encoder_decoder
from blip_fast.models.vit import VisionTransformer


class BlipPretrain(BlipITMMixin, MomentumMixin, nn.Module):
    momentum_names = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
    ptr_name = "queue_ptr"

    def __init__(self, cfg: BlipConfig, backend: str | dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.backends = backend_map(backend)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        init_queues(self, cfg, with_idx=False, ptr_name=self.ptr_name)
        self.visual_encoder = VisionTransformer(cfg.vision, self.backends.get("attention"))
        self.text_encoder = BertModel(cfg.text, cfg.vision.width, self.backends)
        self.text_decoder = BertLMHeadModel(cfg.text, cfg.vision.width, self.backends)
        tie_encoder_decoder(self.text_encoder, self.text_decoder.bert)
        # The LM head follows the word embedding it was tied to, now the shared one.
        self.text_decoder.cls.predictions.decoder.weight = (
            self.text_encoder.embeddings.word_embeddings.weight
        )
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
        self.itm_head = itm_head(cfg)
        self._make_momentum()

    def enqueue(self, image_feat_m, text_feat_m):
        enqueue(self, self.ptr_name, image_feat_m, text_feat_m)
