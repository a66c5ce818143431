"""Fine-tuning a pre-trained scPRINT on a labeled h5ad: peft LoRA on the transformer
blocks plus a new classification head (`scprint finetune`, see scprint.finetune.run)."""
