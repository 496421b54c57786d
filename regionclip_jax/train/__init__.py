"""Training: the loop, its state and checkpoints, and one task per mode.

  run.py                 `run_task`: the lifecycle of every mode (validate once -> data ->
                         task -> resume or initial weights -> train -> export -> evaluate)
  loop.py                `train`: the jitted, sharded, resumable train loop over a `Task`
  state.py, optim.py     the train state and its optimizer
  checkpointing.py       Orbax checkpoints (with the data iterator), restore fallbacks
  metrics.py             TensorBoard / metrics.jsonl writer, progress lines
  throughput.py          FLOPs and MFU of the compiled step
  clip_trainer.py        mode `clip`: image-level CLIP
  pretrain_trainer.py    mode `pretrain`: RegionCLIP region-text pretraining
  detection_trainer.py   mode `detect`: open-vocabulary detection fine-tuning / evaluation
  rpn_trainer.py         mode `rpn`: class-agnostic RPN training
Each trainer's `run(config, workdir, **kwargs)` is `run.run_task` with the mode's `make_task`.
"""
