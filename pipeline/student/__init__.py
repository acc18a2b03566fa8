"""Stage two, cache -> student: the training loop (train), one step (step), the losses, the student model
and its initialisation (model, select), the data path (batches, gather, sampler), general distillation (general),
the run dir (run_dir, checkpoint, state_file), the report and the sweep (sweep, sweep_grid). It imports
pipeline.core and pipeline.cache only, never pipeline.teacher or pipeline.negatives: everything it learns from
comes through the cache."""
