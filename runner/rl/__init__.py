"""RL and preference arithmetic as pure functions of tensors (no engines, no I/O): `ops` (log-probs, entropy,
masked means), `kl` (KL-penalised rewards, controllers, running moments), `advantages` (estimators registered by
name), `losses` (policy, value, pairwise), `experience` (the typed batch on-policy methods train on).

The names below are the package's public API, loaded when first used: importing `runner.rl.advantages` to check an
estimator's name (as the driver does) imports no torch."""

import importlib

_API = {
    "gae": "advantages",
    "KLController": "kl",
    "RunningMoments": "kl",
    "token_rewards": "kl",
    "pairwise_loss": "losses",
    "policy_loss": "losses",
    "value_loss": "losses",
    "entropy_of": "ops",
    "last_index": "ops",
    "logprobs_of": "ops",
    "logprobs_and_entropy": "ops",
    "masked_mean": "ops",
    "whiten": "ops",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f"runner.rl.{_API[name]}"), name)
    raise AttributeError(f"module 'runner.rl' has no attribute {name!r}")
