"""PPO: RLHF of an SFT model against a reward model (DeepSpeed-Chat's step 3), with a critic and GAE.

python -m runner step=ppo step.actor_from=outputs/sft/<run>/export step.critic_from=outputs/reward/<run>/export
"""

from runner.stages.ppo.spec import PPO

METHOD = PPO()
