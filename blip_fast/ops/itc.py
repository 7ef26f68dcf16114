"""Image-text contrastive loss with momentum distillation and feature queues (BLIP ITC).

Shapes: image_feat / text_feat / image_feat_m / text_feat_m (B, D); image_queue / text_queue
(D, Q) as stored; idx (B,); idx_queue (Q,) or (1, Q).
"""
from blip_fast.ops import _backend, reference


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
             temp, alpha, idx=None, idx_queue=None, backend=None):
    """Scalar ITC loss, both directions averaged; gradients flow to the student features and
    temp. See ``reference.itc_loss`` for the exact math."""
    _backend.resolve("itc", image_feat.device, backend)
    return reference.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue,
                              text_queue, temp, alpha, idx, idx_queue)
