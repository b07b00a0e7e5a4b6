"""kdengine.infer: the runtime equals the packed model bit for bit, plans, errors, and the CLI."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from kdengine.infer import InferenceModel, LatencyStats, MAX_PLANS, infer_main, load, load_input
from kdengine.nn import binarize_model, pack_model
from kdengine.serialize import save_packed


def _randomize_bn_(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def conv_model(mode: str, seed: int = 0) -> nn.Module:
    """Every layer type the runtime specialises: conv (padding, stride, dilation), pools, BN,
    flatten, dropout, identity, ReLU, Hardtanh, linear with and without bias; odd K."""
    torch.manual_seed(seed)
    m = nn.Sequential(OrderedDict([
        ("c0", nn.Conv2d(1, 6, 3, padding=1)), ("p0", nn.MaxPool2d(2)), ("b0", nn.BatchNorm2d(6)),
        ("c1", nn.Conv2d(6, 10, 3, padding=1, bias=True)), ("b1", nn.BatchNorm2d(10)),
        ("c2", nn.Conv2d(10, 12, (3, 2), stride=2, padding=(1, 2), dilation=(1, 2))),
        ("p2", nn.AvgPool2d(1)), ("b2", nn.BatchNorm2d(12)), ("drop", nn.Dropout(0.3)),
        ("flat", nn.Flatten()),
        ("tail", nn.Sequential(OrderedDict([
            ("f0", nn.Linear(12 * 4 * 5, 37)), ("b3", nn.BatchNorm1d(37)), ("act", nn.Hardtanh()),
            ("f1", nn.Linear(37, 21, bias=False)), ("relu", nn.ReLU()), ("id", nn.Identity()),
            ("out", nn.Linear(21, 10)),
        ]))),
    ]))
    b = binarize_model(m, mode=mode).eval()
    _randomize_bn_(b, torch.Generator().manual_seed(seed + 1))
    return pack_model(b)


def mlp_model(seed: int = 0, hidden: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Flatten(), nn.Linear(784, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden), nn.Linear(hidden, 10),
    )
    b = binarize_model(m, mode="both").eval()
    _randomize_bn_(b, torch.Generator().manual_seed(seed + 1))
    return pack_model(b)


@pytest.fixture(params=["both", "weights"])
def saved_conv(request, tmp_path):
    model = conv_model(request.param)
    path = tmp_path / f"conv_{request.param}.safetensors"
    save_packed(model, path)
    return model, path


def _eager(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_predict_equals_packed_model_bitwise(saved_conv, batch, seed):
    model, path = saved_conv
    im = load(path)
    x = torch.randn(batch, 1, 16, 16)
    ref = _eager(model, x)
    first = im.predict(x)  # builds the plan
    second = im.predict(x)  # runs it
    assert torch.equal(first, ref)
    assert torch.equal(second, ref)
    x2 = torch.randn(batch, 1, 16, 16)
    assert torch.equal(im.predict(x2), _eager(model, x2))  # fresh data through the same plan


def test_reference_backend_gives_the_same_logits(saved_conv):
    _, path = saved_conv
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(load(path, backend="reference").predict(x), load(path).predict(x))


def test_output_is_a_fresh_ordinary_tensor_and_input_untouched(tmp_path):
    # ReLU first: the runtime must not run it in place on the caller's tensor
    torch.manual_seed(0)
    m = pack_model(binarize_model(nn.Sequential(nn.ReLU(), nn.Linear(40, 40), nn.BatchNorm1d(40),
                                                nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5)),
                                  mode="both").eval())
    path = tmp_path / "m.safetensors"
    save_packed(m, path)
    im = load(path)
    x = torch.randn(3, 40)
    x_before = x.clone()
    y1 = im.predict(x)
    assert torch.equal(x, x_before)
    assert not torch.is_inference(y1) and not y1.requires_grad
    y1_copy = y1.clone()
    y2 = im.predict(x)
    assert torch.equal(y1, y1_copy)  # a later call did not overwrite an earlier result
    assert y2.data_ptr() != y1.data_ptr()
    y1.add_(1.0)  # an ordinary tensor: in-place works outside inference mode
    assert torch.equal(im.predict(x), y2)


def test_plans_cached_per_shape_and_bounded(saved_conv):
    _, path = saved_conv
    im = load(path)
    for b in (1, 2, 1, 2):
        im.predict(torch.randn(b, 1, 16, 16))
    assert len(im._plans) == 2
    for b in range(3, 3 + MAX_PLANS + 2):
        im.predict(torch.randn(b, 1, 16, 16))
    assert len(im._plans) == MAX_PLANS
    im.reset()
    assert len(im._plans) == 0


def test_binary_layer_steps_are_the_layers_own_plans(saved_conv):
    """The runtime's step for a packed layer is the layer's inference_plan, the code its forward
    runs: the same kind, and on the layer's input the same output as the layer. (Layers the
    runtime chains packed-to-packed run their plan with packed input / output instead:
    tests/test_binary_packed_out.py.)"""
    from kdengine.nn import PackedBinaryConv2d, PackedBinaryLinear

    model, path = saved_conv
    im = load(path)
    x = torch.randn(3, 1, 16, 16)
    steps = {st["layer"]: st for st in im.plan_summary(x)["steps"]}
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: inputs.__setitem__(n, (a[0], y)))
             for n, m in model.named_modules() if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d))]
    _eager(model, x)
    for h in hooks:
        h.remove()
    assert len(inputs) == 4  # c1, c2, tail.f0, tail.f1
    unchained = {n: v for n, v in inputs.items()
                 if not any(w in steps[n]["step"] for w in ("thresholded", "packed input"))}
    # in mode "both" every binary layer here is in a chain (conv -> BN -> conv, linear -> BN ->
    # hardtanh -> linear); in mode "weights" none is
    assert len(unchained) == (0 if model.c1.mode == "both" else 4)
    for name, (xi, yi) in unchained.items():
        m = model.get_submodule(name)
        plan = m.inference_plan(xi, out_buffer=True)
        assert steps[name]["step"] == plan.kind
        assert steps[name]["out_shape"] == plan.out_shape == tuple(yi.shape)
        assert torch.equal(plan.run(xi), yi)


def test_spiking_binary_layers_run_their_plans_bitwise(seed):
    """A spiking binary net (T, B, ...) through the runtime equals its eager forward bit for bit,
    each binary step being the layer's plan."""
    from kdengine.snn import IFNeuron, MultiStep, SpikingBinaryConv2d, SpikingBinaryLinear

    def pm1(*shape):
        return torch.randint(0, 2, shape).float() * 2 - 1

    net = nn.Sequential(
        MultiStep(nn.Conv2d(1, 6, 3, padding=1)), IFNeuron(0.5),
        SpikingBinaryConv2d.from_signs(pm1(8, 6, 3, 3), torch.rand(8), torch.randn(8), 2, 1),
        IFNeuron(0.7), MultiStep(nn.Flatten()),
        SpikingBinaryLinear.from_signs(pm1(5, 8 * 4 * 4), torch.rand(5), torch.randn(5)),
    ).eval()
    x = torch.rand(4, 2, 1, 8, 8)
    with torch.no_grad():
        ref = net(x)
    for m in net:
        if isinstance(m, IFNeuron):
            m.reset()
    im = InferenceModel(net)
    kinds = [st["step"] for st in im.plan_summary(x)["steps"]]
    assert sum("and-popcount" in k for k in kinds) == 2
    for m in net:
        if isinstance(m, IFNeuron):
            m.reset()
    assert torch.equal(im.predict(x), ref)


def test_plan_summary_preallocated_buffers(tmp_path):
    model = mlp_model(hidden=48)
    path = tmp_path / "mlp.safetensors"
    save_packed(model, path)
    im = load(path)
    s = im.plan_summary(torch.randn(5, 1, 28, 28))
    # the two fp32 Linear layers (784->48 first, 48->10 last) write into (B, out) buffers
    assert s["prealloc_bytes"] == 5 * (48 + 10) * 4
    kinds = [st["step"] for st in s["steps"]]
    assert sum("xnor-popcount" in k for k in kinds) == 1
    assert s["steps"][-1]["out_shape"] == (5, 10)


def test_weights_mode_preallocates_binary_linear_output(tmp_path):
    model = conv_model("weights")
    path = tmp_path / "w.safetensors"
    save_packed(model, path)
    s = load(path).plan_summary(torch.randn(2, 1, 16, 16))
    by_layer = {st["layer"]: st for st in s["steps"]}
    # tail.f1 is a PackedBinaryLinear (mode weights): its (2, 21) output is a buffer
    assert by_layer["tail.f1"]["type"] == "PackedBinaryLinear"
    assert by_layer["tail.f1"]["prealloc_bytes"] == 2 * 21 * 4
    assert by_layer["drop"]["step"].startswith("skipped")


def test_bad_inputs_raise_specific_errors(saved_conv):
    model, path = saved_conv
    im = load(path)
    with pytest.raises(ValueError, match=r"^input has shape \(2, 3, 16, 16\); the model expects \(N, 1, H, W\)$"):
        im.predict(torch.randn(2, 3, 16, 16))  # 3 channels, the model takes 1
    with pytest.raises(ValueError, match=r"input has shape \(1, 16, 16\); the model expects \(N, 1, H, W\)"):
        im.predict(torch.randn(1, 16, 16))  # no batch dimension: predict takes batches
    with pytest.raises(ValueError, match="layer"):
        im.predict(torch.randn(2, 1, 3, 3))  # the channels fit, the size does not: the layer says
    with pytest.raises(TypeError, match="floating"):
        im.predict(torch.ones(2, 1, 16, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        im.predict([1.0, 2.0])
    with pytest.raises(ValueError, match="batch"):
        im.predict(torch.randn(0, 1, 16, 16))


def test_nan_input(tmp_path, saved_conv):
    model, path = saved_conv
    x = torch.randn(2, 1, 16, 16)
    x[0, 0, 3, 3] = float("nan")
    if model.c1.mode == "both":
        with pytest.raises(ValueError, match="NaN"):
            load(path).predict(x)
    else:  # binary weights, real activations: NaN in, NaN out
        assert torch.isnan(load(path).predict(x)[0]).any()


def test_numpy_input_and_predict_batches(tmp_path):
    model = mlp_model()
    path = tmp_path / "mlp.safetensors"
    save_packed(model, path)
    im = load(path)
    x = torch.randn(10, 1, 28, 28)
    ref = _eager(model, x)
    assert torch.equal(im.predict(x.numpy()), ref)
    out = im.predict_batches(x, 3)
    assert out.shape == (10, 10)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # fp32 first layer: batch-size rounding
    with pytest.raises(ValueError, match="batch"):
        im.predict_batches(x, 0)


def test_latency_stats(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_packed(mlp_model(), path)
    st = load(path).latency(torch.randn(1, 1, 28, 28), repeat=25, warmup=2)
    assert isinstance(st, LatencyStats)
    assert st.repeat == 25 and st.batch == 1
    assert 0 < st.min_ms <= st.p50_ms <= st.p99_ms <= st.max_ms
    with pytest.raises(ValueError, match="repeat"):
        load(path).latency(torch.randn(1, 1, 28, 28), repeat=0)


def test_concurrent_callers_get_their_own_results(tmp_path):
    model = mlp_model()
    path = tmp_path / "mlp.safetensors"
    save_packed(model, path)
    im = load(path)
    xs = [torch.randn(1, 1, 28, 28) for _ in range(4)]
    refs = [_eager(model, x) for x in xs]
    bad = []

    def worker(i):
        for _ in range(30):
            if not torch.equal(im.predict(xs[i]), refs[i]):
                bad.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load(junk)
    with pytest.raises(ValueError, match="backend"):
        load(junk, backend="gpu")
    with pytest.raises(TypeError):
        InferenceModel("not a module")


def test_adapt_input(tmp_path):
    path = tmp_path / "c.safetensors"
    save_packed(conv_model("both"), path)
    im = load(path)
    assert im.adapt_input(torch.zeros(5, 16, 16)).shape == (5, 1, 16, 16)
    assert im.adapt_input(torch.zeros(16, 16)).shape == (1, 1, 16, 16)
    lin = InferenceModel(nn.Sequential(nn.Linear(784, 10)))
    assert lin.adapt_input(torch.zeros(3, 28, 28)).shape == (3, 784)
    assert lin.adapt_input(torch.zeros(784)).shape == (1, 784)


def test_wrong_input_shape_names_the_expected_shape(tmp_path):
    """A file saved with input_shape names the full expected shape; without it, what the first
    layer fixes. The CLI's single-sample form is accepted and named too."""
    path = tmp_path / "c.safetensors"
    model = conv_model("both")
    save_packed(model, path, input_shape=(1, 16, 16))
    im = load(path)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(im.predict(x), _eager(model, x))
    with pytest.raises(ValueError) as e:
        im.predict(torch.randn(2, 1, 28, 28))
    assert str(e.value) == "input has shape (2, 1, 28, 28); the model expects (N, 1, 16, 16)"
    with pytest.raises(ValueError) as e:
        im.adapt_input(torch.randn(5, 3, 16))
    assert str(e.value) == ("input has shape (5, 3, 16); the model expects (N, 1, 16, 16) or "
                            "(1, 16, 16)")
    assert im.adapt_input(torch.randn(1, 16, 16)).shape == (1, 1, 16, 16)
    # no recorded shape, first layer linear after a flatten: the number of values per sample
    lin = InferenceModel(mlp_model(hidden=16))
    with pytest.raises(ValueError) as e:
        lin.predict(torch.randn(3, 1, 20, 20))
    assert str(e.value) == ("input has shape (3, 1, 20, 20); the model expects (N, 784), or (N, ...) "
                            "with 784 values per sample")
    assert lin.predict(torch.randn(3, 784)).shape == (3, 10)
    assert lin.adapt_input(torch.randn(28, 28)).shape == (1, 28, 28)
    plain = InferenceModel(nn.Sequential(nn.Linear(12, 3)))
    with pytest.raises(ValueError, match=r"expects \(N, 12\) or \(12,\)$"):
        plain.adapt_input(torch.randn(4, 13))


def test_saved_input_shape_is_checked(tmp_path):
    model = conv_model("weights")
    for bad in ((), (0, 16), (1.5, 2), [True], "16", (1,) * 9):
        with pytest.raises(ValueError, match="input_shape"):
            save_packed(model, tmp_path / "bad.safetensors", input_shape=bad)
    from kdengine.serialize import read_manifest

    save_packed(model, tmp_path / "ok.safetensors", input_shape=[1, 16, 16])
    assert read_manifest(tmp_path / "ok.safetensors")["input_shape"] == [1, 16, 16]
    save_packed(model, tmp_path / "none.safetensors")
    assert "input_shape" not in read_manifest(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def mlp_file(tmp_path):
    model = mlp_model()
    path = tmp_path / "mlp.safetensors"
    save_packed(model, path)
    return model, path


def test_cli_mnist_json(mlp_file, capsys):
    model, path = mlp_file
    rc = infer_main([str(path), "mnist:test:20", "--batch", "4", "--json", "--repeat", "5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    x, y, _ = load_input("mnist:test:20")
    pred = _eager(model, x).argmax(1)
    assert out["n"] == 20 and out["predictions"] == pred.tolist()
    assert out["correct"] == int((pred == y).sum())
    assert out["accuracy"] == pytest.approx(out["correct"] / 20)
    assert out["latency_batch1_ms"]["repeat"] == 5 and out["latency_batchN_ms"]["batch"] == 4
    assert out["latency_batch1_ms"]["p50_ms"] <= out["latency_batch1_ms"]["p99_ms"]


def test_cli_text_npy_and_safetensors(mlp_file, tmp_path, capsys):
    model, path = mlp_file
    x, y, _ = load_input("mnist:test:7")
    pix = (x * 255).round().to(torch.uint8).squeeze(1).numpy()  # (7, 28, 28) uint8
    npy = tmp_path / "imgs.npy"
    np.save(npy, pix)
    assert infer_main([str(path), str(npy), "--repeat", "3"]) == 0
    text = capsys.readouterr().out
    pred = _eager(model, torch.from_numpy(pix).float().div(255).unsqueeze(1)).argmax(1)
    assert "predictions: " + " ".join(map(str, pred.tolist())) in text
    assert "accuracy" not in text and "p99" in text

    from safetensors.torch import save_file

    st = tmp_path / "imgs.safetensors"
    save_file({"images": torch.from_numpy(pix), "labels": y}, st)
    assert infer_main([str(path), str(st), "--repeat", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predictions"] == pred.tolist()
    assert out["correct"] == int((pred == y).sum())


def test_cli_wrong_shape_names_the_expected_shape(tmp_path, capsys):
    """The command line: the error names the INPUT's shape and the model's, exit status 2."""
    import subprocess
    import sys

    path = tmp_path / "c.safetensors"
    save_packed(conv_model("both"), path, input_shape=(1, 16, 16))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 3, 16, 16), dtype=np.float32))
    assert infer_main([str(path), str(wrong)]) == 2
    assert capsys.readouterr().err == ("kdengine infer: error: input has shape (5, 3, 16, 16); the model "
                                       "expects (N, 1, 16, 16) or (1, 16, 16)\n")
    ok = tmp_path / "ok.npy"
    np.save(ok, np.zeros((5, 16, 16), dtype=np.float32))  # grey images without a channel dimension
    assert infer_main([str(path), str(ok), "--repeat", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 5
    code = "import sys; from kdengine.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "infer", str(path), str(wrong)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "error: input has shape (5, 3, 16, 16); the model expects (N, 1, 16, 16)" in out.stderr


def test_cli_every_argument_has_help():
    from kdengine.infer.runtime import infer_parser

    actions = [a for a in infer_parser()._actions if a.dest != "help"]
    assert {a.dest for a in actions} >= {"model", "input", "batch", "json", "repeat", "threads",
                                         "backend", "max_input_mb", "show"}
    for a in actions:
        assert a.help and len(a.help) > 10, a.dest


def test_cli_errors(mlp_file, tmp_path, capsys):
    _, path = mlp_file
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert infer_main([str(path), str(obj)]) == 2
    assert "pickle" in capsys.readouterr().err
    assert infer_main([str(path), "mnist:test:0"]) == 2
    assert infer_main([str(path), "mnist:nope"]) == 2
    assert infer_main([str(path), str(tmp_path / "none.npy")]) == 2
    assert infer_main([str(tmp_path / "none.safetensors"), "mnist:test:2"]) == 2
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 5, 5), dtype=np.float32))
    assert infer_main([str(path), str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("kdengine infer: error: input has shape (2, 5, 5); the model expects "
                                "(N, 784), or (N, ...) with 784 values per sample, or (784,)")
    assert infer_main([str(path), "mnist:test:2", "--batch", "0"]) == 2
