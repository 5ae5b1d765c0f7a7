"""mtrl: GRPO training for reasoning LLMs with multi-temperature sampling."""
