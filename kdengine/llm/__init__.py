"""LLM-scale distillation: vocabulary-parallel KD and the Hugging Face integration."""
