"""An exponential moving average of a trained engine's weights (DeepSpeed-Chat's `--enable_ema`)."""

from __future__ import annotations

import torch

from runner.train.engine import Dist


class EMA:
    """ema = beta * ema + (1 - beta) * w after every step. Each rank keeps the average of what it holds: its
    partition under ZeRO-3, the whole model otherwise; `rank_state_dict` is therefore per rank."""

    def __init__(self, engine, beta: float, dist: Dist):
        self.beta, self.dist = beta, dist
        self.zero3 = engine.zero_optimization_partition_weights()
        self.params = list(engine.module.named_parameters(remove_duplicate=False))
        self.shadow = [self._local(p).detach().float().clone() for _, p in self._unique()]

    def _unique(self):
        seen = set()
        for name, p in self.params:
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if self.zero3 else p.data

    @torch.no_grad()
    def update(self) -> None:
        for s, (_, p) in zip(self.shadow, self._unique()):
            s.mul_(self.beta).add_(self._local(p).detach().float(), alpha=1.0 - self.beta)

    def state_dict(self) -> list[torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[torch.Tensor]) -> None:
        for s, saved in zip(self.shadow, shadow):
            s.copy_(saved)

    def full_state(self, base: dict | None) -> dict | None:
        """`base` (the engine's full state dict on rank 0) with every parameter replaced by its average (collective
        under ZeRO-3: the partitions are gathered)."""
        import deepspeed.comm as dist_comm

        averaged = {}
        for s, (_, p) in zip(self.shadow, self._unique()):
            if self.zero3:
                local = s.to(self.dist.device)
                parts = [torch.empty_like(local) for _ in range(self.dist.world)]
                dist_comm.all_gather(parts, local)
                full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            else:
                full = s
            averaged[id(p)] = full
        if base is None:
            return None
        for name, p in self.params:
            if name in base:
                base[name] = averaged[id(p)].to(base[name].dtype).cpu()
        return base
