"""Numerical building blocks: the selective scan (kernels or reference) and the sliced linear
heads' losses (cross-entropy, and the KL divergence to a teacher) and per-token log-probabilities."""

from .linear_cross_entropy import (linear_cross_entropy, linear_kl_divergence, linear_nll_and_correct,
                                   linear_token_logprobs)
from .selective_scan import selective_scan_reference

__all__ = ["linear_cross_entropy", "linear_kl_divergence", "linear_nll_and_correct", "linear_token_logprobs",
           "selective_scan_reference"]
