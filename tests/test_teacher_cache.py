"""Offline teacher cache (kdengine.llm.teacher_cache): round trip, packing, validation."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from kdengine.llm.teacher_cache import (
    build_teacher_cache,
    bytes_per_token,
    index_bytes_for_vocab,
    load_teacher_cache,
    pack_indices,
    teacher_cache_report,
    unpack_indices,
)
from kdengine.llm.topk import topk_kd_loss


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens))) * 3


def _batches(vocab, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, s, generator=g) for s in shapes]


def test_round_trip_matches_the_teacher(tmp_path, seed):
    vocab, k, temp = 50, 7, 2.0
    model = TinyLM(vocab)
    batches = _batches(vocab, [(2, 5), (3, 4), (1, 1)])
    path = tmp_path / "cache.safetensors"
    man = build_teacher_cache(model, batches, path, k, temp, source="TinyLM on random tokens")
    assert man["num_tokens"] == 10 + 12 + 1 and man["index_bytes"] == 2
    assert man["bytes_per_token"] == k * 4
    cache = load_teacher_cache(path)
    assert len(cache) == 3 and cache.vocab_size == vocab and cache.k == k
    assert cache.temperature == temp and cache.source == "TinyLM on random tokens"
    with torch.no_grad():
        for (idx, lp), b in zip(cache, batches):
            ref = torch.log_softmax(model(b) / temp, -1)
            vals, ind = ref.topk(k, -1)
            assert idx.shape == b.shape + (k,) and idx.dtype == torch.int64
            assert lp.shape == b.shape + (k,) and lp.dtype == torch.float32
            assert torch.equal(idx, ind)
            torch.testing.assert_close(lp, vals.to(torch.bfloat16).float())
            torch.testing.assert_close(lp, vals, rtol=1e-2, atol=1e-2)
    i0, l0 = cache.rows(0, 10)
    assert torch.equal(i0, cache[0][0].reshape(10, k))
    # usable by the loss directly
    idx, lp = cache[1]
    s = torch.randn(3, 4, vocab, requires_grad=True)
    loss = topk_kd_loss(s, idx, lp, temp, missing_mass="tail")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    info = teacher_cache_report(path)
    assert info["bytes_per_token"] == 28 and info["dense_bf16_bytes_per_token"] == 100


def test_teacher_returning_mapping_and_training_mode_restored(tmp_path):
    vocab = 20
    model = TinyLM(vocab).train()
    calls = []

    def teacher(x):
        calls.append(model.training)
        return {"logits": model(x)}

    build_teacher_cache(teacher, _batches(vocab, [(4,)]), tmp_path / "a.st", 3)
    build_teacher_cache(model, _batches(vocab, [(4,)]), tmp_path / "b.st", 3)
    assert model.training
    assert load_teacher_cache(tmp_path / "a.st").num_tokens == 4


@pytest.mark.parametrize("vocab,nb", [(2, 2), (1 << 16, 2), ((1 << 16) + 1, 3), (1 << 24, 3),
                                      ((1 << 24) + 1, 4)])
def test_index_packing(vocab, nb):
    assert index_bytes_for_vocab(vocab) == nb
    ids = torch.tensor([0, 1, 255, 256, vocab - 1, vocab // 2])
    packed = pack_indices(ids, nb)
    assert packed.dtype == torch.uint8 and packed.shape == (6, nb)
    assert torch.equal(unpack_indices(packed), ids)


def test_uint24_vocabulary_round_trip(tmp_path):
    vocab = 70000  # > 2^16: three bytes per id

    def teacher(x):
        out = torch.full((x.shape[0], vocab), -5.0)
        out[:, 69999] = 5.0
        out[:, 65537] = 4.0
        return out

    path = tmp_path / "c.st"
    man = build_teacher_cache(teacher, [torch.zeros(3)], path, 2)
    assert man["index_bytes"] == 3 and man["bytes_per_token"] == 2 * 5
    idx, lp = load_teacher_cache(path)[0]
    assert idx.tolist() == [[69999, 65537]] * 3


def test_bytes_per_token_figure():
    assert bytes_per_token(64, 32000) == 256
    assert bytes_per_token(64, 128256) == 320
    print(f"k=64, V=32000: {bytes_per_token(64, 32000)} bytes/token (dense bf16: 64000)")


def _build(tmp_path, name="x.safetensors"):
    path = tmp_path / name
    build_teacher_cache(TinyLM(30), _batches(30, [(2, 3)]), path, 4, source="t")
    return path


def _rewrite_manifest(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    man = json.loads(header["__metadata__"]["kdengine_teacher_cache"])
    edit(man, header)
    header["__metadata__"]["kdengine_teacher_cache"] = json.dumps(man)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])


def test_corrupted_payload_names_the_file(tmp_path):
    path = _build(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="x.safetensors.*payload hash"):
        load_teacher_cache(path)


def test_altered_manifest_names_the_file(tmp_path):
    path = _build(tmp_path)
    _rewrite_manifest(path, lambda m, h: m.update(temperature=3.0))
    with pytest.raises(ValueError, match="x.safetensors.*manifest hash"):
        load_teacher_cache(path)


def test_truncated_and_garbage_files(tmp_path):
    path = _build(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="x.safetensors.*truncated"):
        load_teacher_cache(path)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="x.safetensors"):
        load_teacher_cache(path)
    with pytest.raises(ValueError, match="missing.safetensors"):
        load_teacher_cache(tmp_path / "missing.safetensors")


def _rehash(edit):
    from kdengine._integrity import manifest_sha256 as _manifest_sha256

    def f(m, h):
        edit(m, h)
        m["manifest_sha256"] = _manifest_sha256(m)

    return f


def test_consistent_but_wrong_manifests_are_rejected(tmp_path):
    cases = [
        (lambda m, h: m.update(vocab_size=3), "k must be"),
        (lambda m, h: m.update(num_tokens=7), "batch_shapes"),
        (lambda m, h: m.update(index_bytes=4), "index_bytes"),
        (lambda m, h: m.update(format_version=2), "format_version"),
        (lambda m, h: m.update(temperature=-1.0), "temperature"),
    ]
    for i, (edit, msg) in enumerate(cases):
        path = _build(tmp_path, f"m{i}.safetensors")
        _rewrite_manifest(path, _rehash(edit))
        with pytest.raises(ValueError, match=f"m{i}.safetensors.*{msg}"):
            load_teacher_cache(path)


def test_indices_out_of_range_rejected(tmp_path):
    """A file whose hashes are consistent but whose ids exceed V (a writer bug or a forgery)."""
    from safetensors.torch import save

    from kdengine._integrity import manifest_sha256 as _manifest_sha256, payload_sha256 as _payload_sha256

    path = _build(tmp_path)
    cache = load_teacher_cache(path)
    man = dict(cache.manifest)
    bad = cache.indices.clone()
    bad[0, 0] = 31
    tensors = {"indices": pack_indices(bad, 2), "logprobs": cache.logprobs}
    man["payload_sha256"] = _payload_sha256(tensors)
    man["manifest_sha256"] = _manifest_sha256(man)
    path.write_bytes(save(tensors, metadata={"format": "kdengine.teacher_cache",
                                             "kdengine_teacher_cache": json.dumps(man)}))
    with pytest.raises(ValueError, match=r"x.safetensors.*indices out of \[0, 30\)"):
        load_teacher_cache(path)


def test_build_validation(tmp_path):
    with pytest.raises(ValueError, match="k = 40"):
        build_teacher_cache(TinyLM(30), _batches(30, [(2,)]), tmp_path / "a", 40)
    with pytest.raises(ValueError, match="empty"):
        build_teacher_cache(TinyLM(30), [], tmp_path / "a", 4)
    with pytest.raises(ValueError, match="temperature"):
        build_teacher_cache(TinyLM(30), _batches(30, [(2,)]), tmp_path / "a", 4, 0.0)
    with pytest.raises(TypeError, match="teacher returned"):
        build_teacher_cache(lambda x: "nope", [torch.zeros(1)], tmp_path / "a", 1)


def test_peaked_teacher_cache_feeds_the_loss_in_float32(tmp_path, seed):
    """bf16 log-probs of a top-k holding ~all the mass can sum a little above 1 once widened to
    float32: the loss accepts them (mass tolerance) for every rule."""
    vocab, k = 40, 40

    def teacher(x):
        return torch.randn(x.shape[0], vocab) * 8

    path = tmp_path / "p.st"
    build_teacher_cache(teacher, [torch.zeros(64)], path, k)
    idx, lp = load_teacher_cache(path)[0]
    assert lp.dtype == torch.float32
    s = torch.randn(64, vocab)
    for rule in ("renormalize", "tail", "uniform"):
        for div in ("forward_kl", "reverse_kl"):
            if (rule, div) == ("renormalize", "reverse_kl"):
                continue
            assert torch.isfinite(topk_kd_loss(s, idx, lp, missing_mass=rule, divergence=div))
