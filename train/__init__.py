"""Training: one loop for every parallelism, and what it uses. Where each thing lives:

    trainer.py      the loop: parallelize, forward_backward, train_step, validation_loss, train
    build.py        before the first step: config checks, tokenizer, model, warm-up, prepare (FP8, LoRA, compile)
    state.py        RunState, the typed run state a checkpoint saves
    checkpoints.py  the one checkpoint writer and reader (plain, DDP, FSDP2, pipelined), resume, export
    optim.py        AdamW parameter groups and the LR schedule
    runlog.py       the run log: a record per interval, metrics.jsonl, loss.png, TensorBoard
    config.py       TrainConfig and its sections; cli.py `mm train`; finetune.py `mm finetune`
    lora.py, lora_files.py, vision_warmup.py   adapters and their files; the encoder warm-up
    data/           reader.py + stages.py (webdataset pipeline), stream.py (resumable stream),
                    augment.py, scenes.py (synthetic grammar), shards.py (`mm shards`)
    parallel/       dist.py (process groups, DDP/FSDP2 wrap), data_parallel.py, pipeline.py (pp x dp grid,
                    schedules), stages.py (cutting the model), gather.py (pipelined optimiser state),
                    router.py (router loads summed over ranks)
    fp8/            linear.py (conversion, FP8 linear and grouped GEMMs), quant.py (E4M3 tiles, backends)
    eval/           scorer.py (`mm eval`), caption_metrics.py, calibrate.py (`mm calibrate`)
"""
