"""lif_multistep: multi-step leaky integrate-and-fire neurons (learnable tau and threshold) with
surrogate gradients.

``op`` holds the validating entry point, its torch.library ops with the autograd formulas and the
per-backend registrations, ``reference`` the step-loop specification and ``triton_kernel`` the
Triton kernels (C++/CUDA kernels: ``kdengine/csrc/lif_multistep/``).
"""
from kdengine.ops.lif_multistep.op import lif_multistep

__all__ = ["lif_multistep"]
