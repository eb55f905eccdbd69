"""The library under the scripts: everything that is not the method itself.

    ivft.load       real weights (GGUF, HF directories) and HF export
    ivft.tokenizer  a tiktoken tokenizer built from the checkpoint's own vocabulary
    ivft.tasks      the task suite and loaders for users' task files
    ivft.lora       LoRA adapters (add, merge, save in PEFT layout)

The method lives in the top-level scripts: model.py (the decoder and its Intervention argument),
extract_iv.py (causal mediation), train.py (guided training), evaluate.py (the scores).
"""
