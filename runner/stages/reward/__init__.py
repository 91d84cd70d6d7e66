"""Reward model: a scalar head on a causal-LM backbone, trained on chosen/rejected pairs (DeepSpeed-Chat's step 2).

python -m runner step=reward model=opt-350m data=rm-static zero=stage3
python -m runner step=reward step.init_from=outputs/sft/<run>/export
"""

from runner.stages.base import Method, Source


class Reward(Method):
    name = "reward"
    data = "pairs"
    sources = (
        Source(
            "init_from",
            (),
            "a Hugging Face model (e.g. an SFT export)",
            "outputs/sft/<run>/export",
            trains=True,
            optional=True,
        ),
    )
    exports = {"export": "reward_model"}
    recipe = "runner.stages.reward.recipe:run"

    def workload(self, cfg, world: int) -> list:
        """A pair (chosen and rejected) per sample through a scalar head."""
        from runner.driver.estimate import Pass

        micro, gas = int(cfg.train.micro_batch_size), int(cfg.train.gradient_accumulation_steps)
        return [Pass("", "train", 2 * micro, int(cfg.data.max_seq_len), head="value", times=gas, what="training")]


METHOD = Reward()
