"""A learned routing-path predictor (ExpertFlow's idea): a small MLP per predicted layer maps the hidden
state entering layer l's experts to scores for the experts of layer l + d, trained on recorded routing.

Lookahead gating reuses the next router as is, so it misses whatever the next layer's attention and
this layer's own experts change; a predictor trained on the model's traces learns that. It is optional:
`Offload(policy="predictive", predictor=path)` uses it, otherwise lookahead gating runs.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn


class LearnedRoutePredictor(nn.Module):
    """heads["t_d"]: Linear(H, width) -> GELU -> Linear(width, E): scores for layer t from layer t - d."""

    def __init__(self, hidden: int, num_experts: int, targets: list[tuple[int, int]], width: int = 256):
        super().__init__()
        self.hidden, self.num_experts, self.width = hidden, num_experts, width
        self.targets = [tuple(t) for t in targets]
        self.heads = nn.ModuleDict({f"{t}_{d}": nn.Sequential(nn.Linear(hidden, width), nn.GELU(),
                                                               nn.Linear(width, num_experts))
                                    for t, d in self.targets})

    def has(self, target: int, depth: int) -> bool:
        return f"{target}_{depth}" in self.heads

    def scores(self, target: int, depth: int, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.heads[f"{target}_{depth}"]
        weight = head[0].weight
        return head(hidden_states.to(device=weight.device, dtype=weight.dtype)).float()

    def save(self, path) -> None:
        torch.save({"hidden": self.hidden, "num_experts": self.num_experts, "width": self.width,
                    "targets": self.targets, "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path, device="cpu") -> "LearnedRoutePredictor":
        """A predictor `save` wrote (bench/train_predictor.py); anything else is a ValueError naming the file."""
        try:
            blob = torch.load(Path(path), map_location="cpu", weights_only=True)
            model = cls(blob["hidden"], blob["num_experts"], [tuple(t) for t in blob["targets"]], blob["width"])
            model.load_state_dict(blob["state"])
        except OSError:  # missing, a directory, unreadable: the file system's own message says which
            raise
        except Exception as err:
            raise ValueError(f"{str(path)!r} is not a route predictor saved by LearnedRoutePredictor.save "
                             f"(bench/train_predictor.py writes one): {type(err).__name__}: {err}") from err
        return model.to(device).eval()


def multi_hot(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(topk_ids.shape[0], num_experts).scatter_(1, topk_ids.long(), 1.0)


def top_k_recall(scores: torch.Tensor, topk_ids: torch.Tensor) -> float:
    """Per token |top-k(scores) ∩ actual| / k, averaged."""
    k = topk_ids.shape[1]
    guess = scores.topk(k, dim=1).indices
    hits = (guess[:, :, None] == topk_ids[:, None, :].to(guess.device)).any(dim=2).sum()
    return hits.item() / topk_ids.numel()


def train_route_predictor(pairs: dict, hidden: int, num_experts: int, *, width: int = 256, epochs: int = 8,
                          batch_size: int = 512, lr: float = 3e-3, seed: int = 0, log=None) -> LearnedRoutePredictor:
    """pairs[(target, depth)] = (X [N, H] hidden states of layer target - depth, topk ids [N, K] of target).
    Multi-label BCE on the chosen experts, AdamW with a cosine schedule; deterministic for a seed."""
    torch.manual_seed(seed)
    model = LearnedRoutePredictor(hidden, num_experts, sorted(pairs), width)
    for (t, d), (x, ids) in sorted(pairs.items()):
        head = model.heads[f"{t}_{d}"]
        y = multi_hot(ids, num_experts)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
        steps = epochs * math.ceil(x.shape[0] / batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen)
            for start in range(0, x.shape[0], batch_size):
                idx = order[start: start + batch_size]
                loss = nn.functional.binary_cross_entropy_with_logits(head(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            if log:
                with torch.no_grad():
                    log(f"layer {t} depth {d} epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, "
                        f"train recall {top_k_recall(head(x[:4096]), ids[:4096]):.3f}")
    return model.eval()
