"""Schema of the native kd_loss kernel (``kdengine::kd_loss_kernel``), defined once per process by
:mod:`kdengine._schemas`; ``csrc/kd_loss/kd_loss.cpp`` (CPU) and ``kd_loss.cu`` (CUDA) only
register kernels for it, so the two backends cannot take different arguments."""

SCHEMAS = (
    "kd_loss_kernel(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
    "bool scale_t2, int divergence, float beta, float hard_weight, int ignore_index, "
    "float label_smoothing, int reduction, bool need_teacher_grad) -> (Tensor, Tensor, Tensor)",
)
