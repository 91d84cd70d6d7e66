"""Training that adapts its own hyperparameters from feedback (train.adapt). After every evaluation the controller
reads the run's objective (its held-out loss, accuracy or reward) and takes

    r        = clip((new - old) / |old| / scale, -clip, clip)      (old - new for an objective to minimise)
    lr_scale = clamp(lr_scale x alpha^r, lr_scale_min, lr_scale_max)       the learning rate is schedule x lr_scale
    gas      = clamp(round(gas x batch_beta^(-r)), gas_min, gas_max)       the global batch, through accumulation

so progress speeds the learning rate up and lets the batch shrink, and a worse evaluation slows it down and averages
over more samples (batch_beta = 1: the batch stays). `scale` is the relative improvement that counts as a full step.
Every decision is logged (adapt/reward, adapt/lr_scale, adapt/batch) and saved in the checkpoint (loop state), so a
resumed run continues the same trajectory. The pure functions below are what the tests check by hand.
"""

from __future__ import annotations

import math

LOWER_IS_BETTER = ("loss", "perplexity")


def minimise(objective: str) -> bool:
    return any(word in objective for word in LOWER_IS_BETTER)


def reward(old: float, new: float, lower_is_better: bool, scale: float, clip: float) -> float:
    """The clipped relative improvement of the objective, in units of `scale`."""
    change = (old - new) if lower_is_better else (new - old)
    relative = change / max(abs(old), 1e-12)
    return max(-clip, min(clip, relative / scale))


def lr_scale(current: float, r: float, alpha: float, low: float, high: float) -> float:
    return max(low, min(high, current * alpha**r))


def accumulation(current: int, r: float, beta: float, low: int, high: int) -> int:
    return max(low, min(high, int(round(current * beta ** (-r)))))


class Controller:
    """The controller's state (a plain dict in the loop's checkpointed state) and one decision per evaluation."""

    def __init__(self, cfg, objective: str, gas: int):
        self.cfg, self.lower = cfg, minimise(objective)
        self.state = {"last": None, "lr_scale": 1.0, "gas": gas, "decisions": 0}

    def decide(self, value: float | None) -> dict | None:
        """The decision after an evaluation whose objective is `value` (None for the first: it only sets `last`)."""
        a, state = self.cfg, self.state
        if value is None or not math.isfinite(value):
            return None
        if state["last"] is None:
            state["last"] = value
            return None
        r = reward(state["last"], value, self.lower, float(a.scale), float(a.clip))
        state["lr_scale"] = lr_scale(state["lr_scale"], r, float(a.alpha), float(a.lr_scale_min), float(a.lr_scale_max))
        state["gas"] = accumulation(state["gas"], r, float(a.batch_beta), int(a.gas_min), int(a.gas_max))
        state["last"], state["decisions"] = value, state["decisions"] + 1
        return {"reward": r, "lr_scale": state["lr_scale"], "gas": state["gas"]}


def scale_learning_rate(engine, scale):
    """Make every scheduler step set the schedule's learning rate x scale() (on top of the schedule); returns a
    function that applies the current scale now (after a decision, or a resume)."""
    scheduler, groups = engine.lr_scheduler, engine.optimizer.param_groups
    base = [g["lr"] for g in groups]  # (no scheduler: the configured learning rate)

    def apply():
        for g, lr in zip(groups, scheduler.get_lr() if scheduler is not None else base):
            g["lr"] = lr * scale()

    if scheduler is not None:
        step = scheduler.step

        def scaled_step(*args, **kwargs):
            out = step(*args, **kwargs)
            apply()
            return out

        scheduler.step = scaled_step
    apply()
    return apply


def attach(task, cfg, loop: dict, dist):
    """Attach a controller to the loop: its state lives in the loop's checkpointed state (a resumed run continues its
    trajectory); returns a function of an evaluation's objective value that applies the next decision to the task's
    main engine (and its gradient accumulation) and returns what to log."""
    micro = int(cfg.train.micro_batch_size) * dist.world
    controller = Controller(cfg.train.adapt, task.objective, int(cfg.train.gradient_accumulation_steps))
    controller.state = loop.setdefault("adapt", controller.state)  # (a resumed run continues its trajectory)
    apply_lr = scale_learning_rate(next(iter(task.engines.values())), lambda: controller.state["lr_scale"])
    if loop.get("eval_last") is not None and controller.state["last"] is None:
        controller.decide(loop["eval_last"].get(task.objective))  # (the starting model's evaluation)
    if hasattr(task, "set_accumulation"):  # (methods with per-batch losses; checks.adapt refuses the others)
        task.set_accumulation(controller.state["gas"])

    def after_evaluation(value: float | None) -> dict:
        decision = controller.decide(value)
        if decision:
            apply_lr()
            if hasattr(task, "set_accumulation"):
                task.set_accumulation(decision["gas"])
        state = controller.state
        return {
            "reward": decision["reward"] if decision else 0.0,
            "lr_scale": state["lr_scale"],
            "batch": state["gas"] * micro,
        }

    return after_evaluation
