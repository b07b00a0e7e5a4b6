"""Schemas of the native LIF kernels (``kdengine::lif_fwd`` / ``lif_bwd``), defined once per process
by :mod:`kdengine._schemas`; ``csrc/lif_multistep/lif_neuron.cpp`` (CPU) and ``lif_neuron.cu``
(CUDA) only register kernels for them.

``params`` is a ``(3,)`` tensor in the state dtype on x's device: ``[leak, v_threshold, r]``
(leak: tau when ``divide``, else the decay factor k = 1/tau; r: v_reset for the hard reset, 0 for
the reset by subtraction). Kernels read it from device memory, so a learned tau or threshold
needs no host round trip. ``lif_bwd`` returns ``(grad_x, grad_v_init, grad_params)``,
grad_params ``(2,)`` = d/d leak, d/d v_threshold (sums over neurons and steps) when
``param_grads``, else an empty tensor. The CPU backward recomputes the pre-reset potentials from
x and v_init (its forward refuses ``save_h``); the CUDA backward reads the h its forward saved,
and also x and v_init when ``param_grads`` (the leak's gradient needs the inputs)."""

SCHEMAS = (
    "lif_fwd(Tensor x, Tensor? v_init, Tensor params, bool hard_reset, bool decay_input,"
    " bool divide, bool save_h) -> (Tensor, Tensor, Tensor)",
    "lif_bwd(Tensor x, Tensor? v_init, Tensor? h, Tensor grad_spikes, Tensor? grad_v,"
    " Tensor params, bool hard_reset, bool decay_input, bool divide, int surrogate, float alpha,"
    " bool detach_reset, bool param_grads) -> (Tensor, Tensor, Tensor)",
)
