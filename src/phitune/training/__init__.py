"""Training: the recipe (`sft.train` = `setup` -> `fit` -> `finish`) and what serves it alone:
engines and distributed strategies, objectives and losses, checkpoints and exact resume, auto
hyperparameters, metrics tracking, the progress line, the run card, streamed weight saving."""
