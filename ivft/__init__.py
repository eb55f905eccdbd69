"""The library under the scripts: everything that is not the method itself. The method lives in
the top-level scripts: model.py (the decoder and its Intervention argument), extract_iv.py (causal
mediation), train.py (guided training), evaluate.py (the scores). No module here imports them.

    models and data
    ivft.load        real weights (GGUF, HF directories) and HF export
    ivft.tokenizer   a tiktoken tokenizer built from the checkpoint's own vocabulary
    ivft.tasks       the task suite and loaders for users' task files
    ivft.prompts     the prompt conventions: prompt and answer ids, exact match, reply_contains
    ivft.lora        LoRA adapters (add, merge, save in PEFT layout)

    evaluation
    ivft.engine      batched inference: shared-prefix scoring, continuous-batching greedy decoding
    ivft.report      JSON reports on disk, tables and plots

    instruction vectors (around extract_iv.py)
    ivft.ivsettings  extraction settings, their defaults and the cache key
    ivft.ivprompts   clean and corrupted prompts of an extraction, and the batched run over them
    ivft.ivfile      the IV file format, cache names and fingerprints, a training run's IVs
    ivft.ivcheck     does an IV bring the instruction back on held-out examples?

    training (around train.py)
    ivft.config      flag presets, checks and derived facts
    ivft.data        encoded examples, replay pools, batch order, micro-batches, lr schedule
    ivft.dist        torchrun setup, collectives, DDP / FSDP2 wrapping, autocast dtype
    ivft.checkpoint  checkpoints, resume, RNG state, the frozen reference model
    ivft.runtime     errors and exit statuses, the log, Ctrl-C / SIGTERM
    ivft.files       one atomic writer, directory swaps, clean-up after crashes
"""
