"""DeepLab segmentation library: plain PyTorch and NumPy, no orchestration."""

__version__ = "0.1.0"
