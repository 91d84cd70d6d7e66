"""SFT: supervised fine-tuning of a causal LM on prompt/response pairs (DeepSpeed-Chat's step 1).

python -m runner step=sft model=opt-1.3b zero=stage3 deployment=single_gpu
"""

from runner.stages.base import Method


class SFT(Method):
    name = "sft"
    data = "sft"
    judged = True
    packs = True
    exports = {"export": "causal_lm"}
    recipe = "runner.stages.sft.recipe:run"


METHOD = SFT()
