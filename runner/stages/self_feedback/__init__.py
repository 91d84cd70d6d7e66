"""Self-feedback SFT (rejection-sampling fine-tuning, best-of-n distillation, expert iteration): in rounds, the policy
samples step.candidates answers per prompt, the `reward` group's judge keeps the best (step.accept), and training
continues on J = alpha x L_data + (1 - alpha) x L_gen over the original SFT rows and the kept answers.

    python -m runner step=self_feedback step.init_from=outputs/sft/<run>/export reward=tiny
    python -m runner recipe=self_feedback_tiny
"""

from runner.stages.self_feedback.spec import SelfFeedback

METHOD = SelfFeedback()
