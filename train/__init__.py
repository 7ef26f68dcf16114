"""Training loops on torch.distributed (shipped as ``blip_fast.train``): pre-training, retrieval
and caption fine-tuning (docs/architecture.md, "Training objectives"), and CapFilt. Entry point:
``blip-fast train``."""
