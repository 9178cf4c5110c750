"""Accelerate launch configurations (DDP, FSDP2, DeepSpeed ZeRO) shipped with align."""
