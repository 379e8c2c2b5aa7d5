"""The VQ-Seq2Seq network: encoder, vector quantizer, hyper-conv decoder (docs/method.md, "Model")."""
from .hyperconv import HyperConv2d
from .quantizer import QuantizerOutput, VectorQuantizer
from .vq_seq2seq import Decoder, Encoded, Encoder, SourceConv, VQSeq2Seq, build_model, sample_latent

__all__ = ["VQSeq2Seq", "VectorQuantizer", "HyperConv2d", "build_model", "sample_latent",
           "Encoder", "Decoder", "Encoded", "SourceConv", "QuantizerOutput"]
