"""Training with the paper's recipe: the resumable loop, its checkpoints and log (`train`),
and the cached LR/HR pairs and reproducible patches it draws from (`data`)."""
