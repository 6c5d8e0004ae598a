"""minititan: a minimal LLM pre-training framework written directly on torch.distributed."""
__version__ = "0.1.0"
