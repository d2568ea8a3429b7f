"""Compute precision of the reference: float32 for low-precision inputs, float64 kept (for gradcheck)."""
import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()
