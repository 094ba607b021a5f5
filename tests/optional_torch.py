"""torch and torch.nn.functional, or None when PyTorch is not installed.

The tests that use them are marked torch, and conftest.py skips those when
torch is missing; the other tests of the same files still run.
"""
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None

__all__ = ["torch", "F"]
