"""LLM-scale distillation: top-k sparse teachers, offline teacher caches."""
