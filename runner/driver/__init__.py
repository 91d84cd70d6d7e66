"""What only the Hydra process runs: plan a composed config (plan, checks, the methods' driver side), prepare data,
build every engine's DeepSpeed JSON (ds_config), write the run directory (rundir), start the launcher (launch) and
record the outcome; pipelines of stages (pipeline), SLURM task coordination (slurm), memory estimates (memory)."""
