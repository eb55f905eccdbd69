"""The library under the scripts. The method is in the top-level scripts: model.py (the decoder and
its Intervention argument), extract_iv.py (causal mediation), train.py (guided training: flags,
schedules, the loss), evaluate.py (the scores). The library takes explicit arguments (or a small
record of its own, e.g. checkpoint.RunFiles); only ivft.config reads train.py's whole flag dict,
to resolve presets and check values. Its modules import model.py (the decoder) but never the
scripts. Two modules hold method decisions and say so in their first line: ivft.ivprompts (the
clean and corrupted prompts of an extraction) and ivft.reference (the KL's frozen reference).

    models and data
    ivft.load        real weights (GGUF, HF directories) and HF export
    ivft.tokenizer   a tiktoken tokenizer built from the checkpoint's own vocabulary
    ivft.tasks       the task suite, loaders for users' task files, the scripts' one loader (load_tasks)
    ivft.prompts     the prompt conventions: prompt and answer ids, exact match, reply_contains
    ivft.lora        LoRA adapters (add, finish a task, reference views, merge, save in PEFT layout)

    evaluation
    ivft.engine      batched inference: shared-prefix scoring, continuous-batching greedy decoding, the autocast dtype
                     (with its pooled KV cache, PoolCache)
    ivft.report      JSON reports on disk, tables and plots

    instruction vectors (around extract_iv.py)
    ivft.ivsettings  extraction settings, their defaults and the cache key
    ivft.ivprompts   method: clean and corrupted prompts of an extraction; the batched run over them
    ivft.ivfile      the IV file format, cache names and fingerprints
    ivft.ivcheck     does an IV bring the instruction back on held-out examples?

    training (around train.py)
    ivft.config      flag presets, their help text, checks and derived facts
    ivft.data        encoded examples, replay pools, batch order, micro-batches
    ivft.dist        torchrun setup, collectives, DDP / FSDP2 wrapping, gradient shares
    ivft.checkpoint  checkpoints, resume, RNG state
    ivft.reference   method: which frozen model the KL keeps the trained one close to
    ivft.optim       AdamW with fp32 master weights for bf16 full fine-tuning
    ivft.memplan     the memory plan of a run from config.json alone (--dry_run)
    ivft.runtime     exit statuses, the log, Ctrl-C / SIGTERM
    ivft.files       one atomic writer, directory swaps, clean-up after crashes, the run-folder lock

    ivft.errors      every exception the project raises on bad input (imports nothing from ivft)
"""
