"""Small modules attached to a frozen model: LoRA (`lora`) and textual-inversion tokens (`embeddings`).
Their files (diffusers/peft, kohya, A1111) are read and written in `ldmkit.io.adapter_files`."""
