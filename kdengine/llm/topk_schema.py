"""Schemas of the native top-k KD kernels (``kdengine::topk_student_*``, CPU kernels in
``csrc/topk_kd/topk_kd.cpp``), defined once per process by :mod:`kdengine._schemas`."""

SCHEMAS = (
    "topk_student_stats(Tensor student, Tensor indices, float inv_t, bool need_rest) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    "topk_student_grad(Tensor student, Tensor rowmax, Tensor logsum, Tensor c1, Tensor c0, "
    "float inv_t) -> Tensor",
)
