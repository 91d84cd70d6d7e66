"""What only the ranks run (started by the launcher on `runner.worker RUN_DIR`): DeepSpeed engines, the shared
training loop, checkpoints, metrics, rollouts and the EMA. Nothing here parses Hydra's command line."""
