"""GRACE (Hartvigsen et al., NeurIPS 2023): a discrete key -> value codebook at one layer."""
from .config import GraceConfig
from .method import Grace

__all__ = ["GraceConfig", "Grace"]
