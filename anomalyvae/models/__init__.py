"""The torch wing: model families, maps and scoring, training, checkpoints, generative uses."""
