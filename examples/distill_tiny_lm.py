"""Distill a tiny randomly initialised Llama-style causal LM into a smaller one with kdengine's fused
KD loss inside a ``transformers.Trainer`` loop (:class:`kdengine.llm.hf.KDTrainer`).

Nothing is downloaded: both models are built from a config (vocabulary 257; teacher hidden 32 with
2 layers, student hidden 16 with 1 layer) and trained on a synthetic token dataset. The teacher is
initialised with a large weight scale so that its next-token distributions are peaked and there is
something to learn.

    pip install 'kdengine[hf]'        # transformers (+ trl for the GKD comparison test)
    python examples/distill_tiny_lm.py --steps 20
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch

VOCAB = 257


class SyntheticTokens(torch.utils.data.Dataset):
    """Token sequences with some structure (noisy arithmetic progressions modulo the vocabulary);
    the last ``pad`` positions of every other sequence are padding (labels -100, attention 0)."""

    def __init__(self, n: int, seq_len: int, seed: int = 0, pad: int = 3):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 7, (n, 1), generator=g)
        ids = (start + step * torch.arange(seq_len)) % VOCAB
        noise = torch.rand(n, seq_len, generator=g) < 0.1
        ids = torch.where(noise, torch.randint(0, VOCAB, (n, seq_len), generator=g), ids)
        self.input_ids = ids
        self.attention_mask = torch.ones_like(ids)
        self.labels = ids.clone()
        self.attention_mask[1::2, seq_len - pad:] = 0
        self.labels[1::2, seq_len - pad:] = -100

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}


def build_models(seed: int = 0):
    """(teacher, student): tiny LlamaForCausalLM built from configs, randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4,
                                           initializer_range=0.3, **common))
    torch.manual_seed(seed + 1)
    student = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, **common))
    return teacher, student


def distill(steps: int = 20, *, batch_size: int = 8, seq_len: int = 24, lr: float = 1e-2,
            temperature: float = 2.0, divergence: str = "forward_kl", beta: float = 0.5,
            hard_weight: float = 0.0, grad_accum: int = 1, seed: int = 0,
            output_dir: str | None = None, verbose: bool = True) -> list[float]:
    """Run ``steps`` optimizer steps of KDTrainer; returns the logged training losses (every step)."""
    from transformers import TrainingArguments, default_data_collator

    from kdengine.llm.hf import KDTrainer

    teacher, student = build_models(seed)
    data = SyntheticTokens(batch_size * grad_accum * steps, seq_len, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, learning_rate=lr, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, disable_tqdm=True, seed=seed, dataloader_num_workers=0,
        )
        trainer = KDTrainer(model=student, args=args, train_dataset=data,
                            data_collator=default_data_collator, teacher_model=teacher,
                            temperature=temperature, divergence=divergence, beta=beta,
                            hard_weight=hard_weight)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if verbose:
        for i, loss in enumerate(losses, 1):
            print(f"step {i:3d}  kd loss {loss:.4f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--hard-weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("this example needs transformers: pip install 'kdengine[hf]'", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    losses = distill(a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                     temperature=a.temperature, divergence=a.divergence, beta=a.beta,
                     hard_weight=a.hard_weight, seed=a.seed)
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"mean loss of the first {k} steps {first:.4f} -> last {k} steps {last:.4f}"
          f" ({'down' if last < first else 'NOT down'})")
    return 0 if math.isfinite(last) else 1


if __name__ == "__main__":
    sys.exit(main())
