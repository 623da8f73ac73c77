"""spectraqlora: QLoRA adapters on the Spectrum-selected (high-SNR) modules of a 4-bit model."""

__version__ = "0.1.0"
