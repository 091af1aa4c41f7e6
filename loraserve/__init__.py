"""loraserve: a self-hosted, Workers AI-compatible server for one base LLM with many LoRA finetunes."""
