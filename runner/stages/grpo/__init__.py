"""Critic-free online RL: GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++ (step=grpo with step.advantage, or the presets
step=rloo | dr_grpo | dapo | reinforce_pp), rewarded by the `reward` group's functions and reward models.

    python -m runner step=grpo step.init_from=outputs/sft/<run>/export reward=tiny
    python -m runner recipe=grpo_tiny
"""

from runner.stages.grpo.spec import GRPO

METHOD = GRPO()
