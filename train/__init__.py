"""Training loops on torch.distributed (shipped as ``blip_fast.train``): pre-training, retrieval
and caption fine-tuning (DESIGN §2), and CapFilt. Entry point: ``blip-fast train``."""
