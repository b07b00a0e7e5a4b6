"""Training: the :class:`Distiller` trainer, its loss terms, checkpoints and DDP helpers, and
:func:`fit`, the recipe-level loop (optimizer and schedule by name) that the demo and the
reproductions train with.

    from kdengine.train import Distiller, CrossEntropyTerm, KDTerm
    d = Distiller(student, torch.optim.SGD(student.parameters(), 0.1),
                  [(0.5, CrossEntropyTerm()), (0.5, KDTerm(4.0))], teacher=teacher, batch_size=128)
    history = d.fit((x_train, y_train), epochs=5, test=(x_test, y_test), checkpoint="run.safetensors")
"""
from kdengine.train import distributed
from kdengine.train.checkpoint import (
    atomic_output,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from kdengine.train.distiller import (
    BatchContext,
    CrossEntropyTerm,
    Distiller,
    FunctionTerm,
    KDTerm,
    LogitsMatchingTerm,
    LossTerm,
    SoftTargetTerm,
    epoch_permutation,
    evaluate,
    global_batches,
    predict_logits,
    seed_everything,
    term_name,
)
from kdengine.train.loop import fit

__all__ = [
    "Distiller", "BatchContext", "LossTerm", "CrossEntropyTerm", "KDTerm", "LogitsMatchingTerm",
    "SoftTargetTerm", "FunctionTerm", "term_name", "evaluate", "predict_logits", "seed_everything",
    "epoch_permutation", "global_batches", "save_checkpoint", "load_checkpoint", "read_checkpoint",
    "atomic_output", "atomic_write_bytes", "atomic_write_text", "distributed", "fit",
]
