"""VQ-Seq2Seq: vector-quantized common latent space for multi-sequence MRI (Han et al., MICCAI 2024)."""

__version__ = "0.1.0"
