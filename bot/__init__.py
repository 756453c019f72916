"""A self-hosted Discord bot that answers questions about images with Qwen2.5-VL."""

__version__ = "0.1.0"
