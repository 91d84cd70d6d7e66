"""DPO and its family: preference optimisation of a policy on chosen/rejected pairs, with no reward model and no
generation (DeepSpeed-Chat's step2_dpo_finetuning, with IPO, hinge, SimPO and ORPO beside it).

    python -m runner step=dpo step.init_from=outputs/sft/<run>/export
    python -m runner step=rlhf step.stages=[sft,dpo]
"""

from runner.stages.dpo.spec import DPO

METHOD = DPO()
