"""Schemas of the native IF kernels (``kdengine::if_fwd`` / ``if_bwd``), defined once per process
by :mod:`kdengine._schemas`; ``csrc/if_multistep/if_neuron.cpp`` (CPU) and ``if_neuron.cu`` (CUDA)
only register kernels for them. The CPU backward recomputes the pre-reset potential ``h`` from
``x`` and ``v_init`` (its forward refuses ``save_h``), the CUDA backward reads the ``h`` its
forward saved; each ignores the arguments the other needs."""

SCHEMAS = (
    "if_fwd(Tensor x, Tensor? v_init, float v_threshold, bool hard_reset, float v_reset,"
    " bool save_h) -> (Tensor, Tensor, Tensor)",
    "if_bwd(Tensor x, Tensor? v_init, Tensor? h, Tensor grad_spikes, Tensor? grad_v,"
    " float v_threshold, bool hard_reset, float v_reset, int surrogate, float alpha,"
    " bool detach_reset) -> (Tensor, Tensor)",
)
