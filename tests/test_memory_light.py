"""Memory-light BPTT (kdengine.snn.memory_light): 1-bit spike storage, gradients bit-identical to
plain autograd through the same layers, side effects undone, the bytes kept for backward."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from kdengine.ops.if_multistep import if_multistep
from kdengine.snn import (
    IFNeuron,
    SpikingBlock,
    SpikingConvBlock,
    SpikingLinearBlock,
    Stateful,
    memory_light_block,
    pack_spike_bits,
    unpack_spike_bits,
)
from tests.backend_params import backend_params

IF_BACKENDS = backend_params("if_multistep", slow_interpreted=True)


def _spikes(*shape, p=0.3, dtype=torch.float32):
    return (torch.rand(*shape) < p).to(dtype)


# --------------------------------------------------------------------------- test neurons


class GainIF(Stateful):
    """IF on ``gain * x`` with a learnable gain: a neuron parameter through the fused kernel."""

    _state_names = ("v",)

    def __init__(self, backend=None):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.3))
        self.backend = backend
        self.v = None

    def forward(self, x):
        s, v = if_multistep(x * self.gain, 0.9, v_init=self.v, return_v=True, backend=self.backend)
        self.v = v
        return s


class TorchPLIF(Stateful):
    """A plain-torch parametric LIF (learnable tau, sigmoid surrogate through a straight-through
    term that is exactly 0 in the forward): stands in for any autograd-built neuron."""

    _state_names = ("v",)

    def __init__(self, tau=2.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(-math.log(tau - 1.0)))
        self.v = None

    def forward(self, x):
        v = torch.zeros_like(x[0]) if self.v is None else self.v
        k = torch.sigmoid(self.w)
        out = []
        for t in range(x.shape[0]):
            h = v + (x[t] - v) * k
            sg = torch.sigmoid(4 * (h - 1.0))
            s = (h >= 1.0).to(x.dtype) + (sg - sg.detach())
            v = h - s * 1.0
            out.append(s)
        self.v = v
        return torch.stack(out)


def _sj(kind):
    sj = pytest.importorskip("spikingjelly.activation_based.neuron",
                             reason="spikingjelly is not installed (optional)")
    from spikingjelly.activation_based import surrogate

    cls = {"IFNode": sj.IFNode, "PLIFNode": sj.ParametricLIFNode}[kind]
    return cls(surrogate_function=surrogate.ATan(), step_mode="m")


NEURONS = {
    "if": lambda b: IFNeuron(0.8, backend=b),
    "if_hard_detach": lambda b: IFNeuron(0.8, -0.1, detach_reset=True, surrogate="sigmoid", backend=b),
    "if_init_potential": lambda b: IFNeuron(0.8, init_potential=0.5, backend=b),
    "op_callable": lambda b: functools.partial(if_multistep, v_threshold=0.6, backend=b),
    "gain_if": lambda b: GainIF(b),
    "torch_plif": lambda b: TorchPLIF(),
}


# --------------------------------------------------------------------------- helpers


def _reset(block):
    for m in block.modules():
        reset = getattr(m, "reset", None)
        if callable(reset) and not isinstance(m, SpikingBlock):
            reset()


def _grads(block, x, g, light, *, chunks=1, g_v=None):
    """Forward (in ``chunks`` along T, state carried), a backward seeded by ``g`` (and ``g_v`` on
    the final potential of an IFNeuron), then every gradient and the spikes."""
    block.memory_light = light
    _reset(block)
    block.zero_grad(set_to_none=True)
    xl = x.detach().clone().requires_grad_(x.requires_grad)
    parts = torch.chunk(xl, chunks) if block.time_steps is None else [xl]
    s = torch.cat([block(p) for p in parts])
    loss = (s * g).sum()
    if g_v is not None:
        loss = loss + (block.neuron.v * g_v).sum()
    loss.backward()
    grads = [xl.grad] + [p.grad for p in block.parameters()]
    return s.detach(), grads


def _assert_identical(block, x, g, **kw):
    s0, g0 = _grads(block, x, g, False, **kw)
    s1, g1 = _grads(block, x, g, True, **kw)
    assert torch.equal(s0, s1)
    assert len(g0) == len(g1)
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert torch.equal(a, b), (i, (a - b).abs().max())
    return g0


# --------------------------------------------------------------------------- 1-bit storage


@pytest.mark.parametrize("shape", [(1,), (31,), (33,), (4096,), (2, 4099), (3, 5, 7, 11), (1, 1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_pack_unpack_round_trip(seed, shape, dtype):
    x = _spikes(*shape, p=0.5, dtype=dtype)
    p = pack_spike_bits(x)
    assert p.words.dtype == torch.int32 and p.words.numel() == math.ceil(x.numel() / 32)
    y = unpack_spike_bits(p)
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, x)


def test_pack_keeps_the_layout(seed):
    x = _spikes(3, 2, 5, 7, 9)
    cl = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (3, 2))
    for t, dense in ((cl, True), (x.transpose(0, 1), True), (x[:, :, :, ::2], False)):
        y = unpack_spike_bits(pack_spike_bits(t))
        assert torch.equal(y, t)
        if dense:  # a dense layout comes back with its strides (the next conv sees the same input)
            assert y.stride() == t.stride()


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan"), float("inf")])
def test_non_spike_input_is_refused(bad):
    blk = SpikingLinearBlock(5, 3)
    x = _spikes(2, 3, 5)
    x[1, 2, 4] = bad
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="x must hold spikes"):
            blk(x)
    with pytest.raises(ValueError, match="must hold spikes"):
        pack_spike_bits(x)
    blk.memory_light = False  # the plain path takes any current
    assert blk(x).shape == (2, 3, 3)


def test_argument_checks():
    with pytest.raises(TypeError, match="synapse must be an nn.Module"):
        SpikingBlock(lambda x: x)
    with pytest.raises(TypeError, match="neuron must be"):
        SpikingBlock(nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="time_steps"):
        SpikingBlock(nn.Linear(2, 2), time_steps=0)
    with pytest.raises(ValueError, match=r"\(T, B, \.\.\.\)"):
        SpikingLinearBlock(2, 2)(torch.zeros(2))
    with pytest.raises(TypeError, match="floating"):
        SpikingLinearBlock(2, 2)(torch.zeros(2, 1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="pool"):
        SpikingConvBlock(1, 1, 1, pool=0)


# --------------------------------------------------------------------------- bit-identical gradients


@pytest.mark.parametrize("backend", IF_BACKENDS)
@pytest.mark.parametrize("neuron", list(NEURONS))
@pytest.mark.parametrize("T", [1, 2, 7])
def test_linear_block_gradients_bit_identical(seed, backend, neuron, T):
    B, fin, fout = 3, 37, 13
    blk = SpikingLinearBlock(fin, fout, NEURONS[neuron](backend))
    x = _spikes(T, B, fin, p=0.5).requires_grad_(True)
    with torch.no_grad():
        blk.synapse.weight.mul_(3.0)  # enough current for spikes at every T
    g = torch.randn(T, B, fout)
    grads = _assert_identical(blk, x, g)
    assert grads[0] is not None and grads[0].abs().sum() > 0


@pytest.mark.parametrize("backend", IF_BACKENDS)
@pytest.mark.parametrize("neuron", ["if", "gain_if", "torch_plif"])
@pytest.mark.parametrize("bias, batch_norm, pool", [(True, False, 1), (False, True, 2), (True, True, 3)])
@pytest.mark.parametrize("T", [1, 3])
def test_conv_block_gradients_bit_identical(seed, backend, neuron, bias, batch_norm, pool, T):
    B, C, H, W = 2, 3, 7 * pool, 5 * pool
    blk = SpikingConvBlock(C, 5, 3, NEURONS[neuron](backend), padding=1, bias=bias, batch_norm=batch_norm,
                           pool=pool)
    x = _spikes(T, B, C, H, W, p=0.4).requires_grad_(True)
    g = torch.randn(T, B, 5, H // pool, W // pool)
    _assert_identical(blk, x, g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_bit_identical(seed, dtype):
    blk = SpikingConvBlock(2, 4, 3, IFNeuron(0.5), padding=1, batch_norm=True).to(dtype)
    x = _spikes(3, 2, 2, 6, 5, dtype=dtype).requires_grad_(True)
    g = torch.randn(3, 2, 4, 6, 5, dtype=dtype)
    _assert_identical(blk, x, g)


@pytest.mark.parametrize("T", [1, 4])
def test_static_input_block_bit_identical(seed, T):
    """Direct encoding: an analog image, no T dimension, kept as is."""
    blk = SpikingConvBlock(1, 4, 3, GainIF(), padding=1, batch_norm=True, time_steps=T)
    x = torch.rand(3, 1, 9, 7).requires_grad_(True)
    g = torch.randn(T, 3, 4, 9, 7)
    _assert_identical(blk, x, g)


def test_chunked_bptt_through_the_carried_state(seed):
    """State carried between chunks keeps its graph: gradients through v across calls, and through
    the final potential, match the plain path's."""
    blk = SpikingLinearBlock(11, 7, GainIF())
    x = _spikes(9, 2, 11, p=0.5).requires_grad_(True)
    g, g_v = torch.randn(9, 2, 7), torch.randn(2, 7)
    grads = _assert_identical(blk, x, g, chunks=3, g_v=g_v)
    assert grads[0][:3].abs().sum() > 0


@pytest.mark.parametrize("kind", ["IFNode", "PLIFNode"])
def test_spikingjelly_neurons_plug_in(seed, kind):
    blk = SpikingConvBlock(2, 3, 3, _sj(kind), padding=1, batch_norm=True)
    x = _spikes(4, 2, 2, 5, 6, p=0.5).requires_grad_(True)
    g = torch.randn(4, 2, 3, 5, 6)
    grads = _assert_identical(blk, x, g)
    if kind == "PLIFNode":
        assert grads[-1] is not None  # the learnable tau got its gradient


def test_dropout_draws_the_same_mask_again(seed):
    blk = SpikingBlock(nn.Sequential(nn.Linear(9, 8), nn.Dropout(0.5)), IFNeuron(0.5))
    x = _spikes(3, 4, 9, p=0.5).requires_grad_(True)
    g = torch.randn(3, 4, 8)
    torch.manual_seed(1)
    s0, g0 = _grads(blk, x, g, False)
    torch.manual_seed(1)
    s1, g1 = _grads(blk, x, g, True)
    assert torch.equal(s0, s1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_a_chain_of_blocks_and_a_plain_readout(seed):
    net = nn.Sequential(
        SpikingConvBlock(1, 4, 3, IFNeuron(0.5), padding=1, batch_norm=True, time_steps=3),
        SpikingConvBlock(4, 6, 3, IFNeuron(0.5), padding=1, batch_norm=True, pool=2),
        SpikingBlock(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4, 10)), IFNeuron(0.5)),
    )
    x = torch.rand(5, 1, 8, 9)
    grads = []
    for light in (False, True):
        for b in net:
            b.memory_light = light
        _reset(net)
        net.zero_grad(set_to_none=True)
        net(x).mean(0).sum().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# --------------------------------------------------------------------------- side effects, limits


def test_backward_undoes_the_recompute_side_effects(seed):
    blk = SpikingConvBlock(2, 3, 3, IFNeuron(0.5, count_spikes=True), padding=1, batch_norm=True)
    x = _spikes(3, 2, 2, 6, 6).requires_grad_(True)
    s = blk(x)
    bn = blk.synapse[1]
    after_fwd = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    count, v = blk.neuron.spike_count, blk.neuron.v
    s.sum().backward()
    assert torch.equal(bn.running_mean, after_fwd[0]) and torch.equal(bn.running_var, after_fwd[1])
    assert int(bn.num_batches_tracked) == after_fwd[2] == 1
    assert blk.neuron.spike_count == count and blk.neuron.v is v


def test_eval_mode_backward_uses_the_forward_statistics(seed):
    """A batch norm in eval mode reads its running statistics: a train-mode call between the
    forward and the backward changes them, and the backward still differentiates what ran."""
    blk = SpikingConvBlock(2, 3, 3, IFNeuron(0.5), padding=1, batch_norm=True).eval()
    with torch.no_grad():
        blk.synapse[1].running_var.fill_(0.5)
    x = _spikes(3, 2, 2, 5, 5, p=0.5).requires_grad_(True)
    g = torch.randn(3, 2, 3, 5, 5)
    _, g_plain = _grads(blk, x, g, False)
    blk.memory_light = True
    _reset(blk)
    blk.zero_grad(set_to_none=True)
    xl = x.detach().clone().requires_grad_(True)
    s = blk(xl)
    blk.train()
    _reset(blk)
    blk(_spikes(3, 2, 2, 5, 5))  # updates the running statistics
    blk.eval()
    (s * g).sum().backward()
    assert torch.equal(xl.grad, g_plain[0])
    assert all(torch.equal(p.grad, q) for p, q in zip(blk.parameters(), g_plain[1:]))


def test_double_backward_raises(seed):
    blk = SpikingLinearBlock(4, 3, IFNeuron(0.5))
    x = _spikes(2, 2, 4, p=0.5).requires_grad_(True)
    (gx,) = torch.autograd.grad(blk(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_no_grad_runs_the_plain_forward(seed):
    blk = SpikingConvBlock(2, 3, 3, IFNeuron(0.5), padding=1)
    x = _spikes(3, 2, 2, 5, 5)
    with torch.no_grad():
        a = blk(x)
    blk.neuron.reset()
    blk.memory_light = False
    assert torch.equal(a, blk(x))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_saved_bytes_are_about_one_bit_per_input_spike(seed):
    T, B, C, H, W = 8, 4, 8, 16, 16
    blk = SpikingConvBlock(C, 8, 3, IFNeuron(0.5), padding=1, batch_norm=True, pool=2)
    x = _spikes(T, B, C, H, W).requires_grad_(True)
    plain_blk = SpikingConvBlock(C, 8, 3, IFNeuron(0.5), padding=1, batch_norm=True, pool=2, memory_light=False)
    light, out = _saved_bytes(lambda: blk(x))
    plain, _ = _saved_bytes(lambda: plain_blk(x))
    bits = x.numel() // 8
    rng = torch.get_rng_state().numel()
    assert light <= bits + rng + 64, (light, bits)
    assert plain >= 2 * x.numel() * 4  # x as float, and more
    out.sum().backward()


def test_functional_entry_point_equals_the_module(seed):
    lin = nn.Linear(6, 4)
    neuron = functools.partial(if_multistep, v_threshold=0.4)
    x = _spikes(5, 3, 6, p=0.5).requires_grad_(True)
    s = memory_light_block(x, lin, neuron)
    (gx,) = torch.autograd.grad(s.sum(), x)
    blk = SpikingBlock(lin, neuron, memory_light=False)
    x2 = x.detach().requires_grad_(True)
    s2 = blk(x2)
    (gx2,) = torch.autograd.grad(s2.sum(), x2)
    assert torch.equal(s, s2) and torch.equal(gx, gx2)
