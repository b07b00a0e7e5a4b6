"""if_multistep: multi-step integrate-and-fire neurons with surrogate gradients.

``op`` holds the validating entry point, its torch.library ops with the autograd formulas and the
per-backend registrations, ``reference`` the step-loop specification and ``triton_kernel`` the
Triton kernels (C++/CUDA kernels: ``kdengine/csrc/if_multistep/``).
"""
from kdengine.ops.if_multistep.op import if_multistep

__all__ = ["if_multistep"]
