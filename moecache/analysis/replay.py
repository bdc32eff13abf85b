"""Routing replayed from a trained model onto a larger target model, so that a random-weight target
(the shapes the study times) routes with the locality real routers have.

A random-weight model routes without structure: its hit rates, its predictor's recall and what token
scheduling gains all reflect random routing. A trained model's routing has structure (tokens alike in
context reuse experts; lookahead gating predicts the next layers), and a small trained model can be
recorded on CPU in seconds. Its routes are recorded per token (`record_token_routes`), mapped onto the
target's layers and experts (`map_routes`), and replayed into the target's patched experts modules
(`RoutingReplay`), where they replace the target router's choice of experts (its combine weights stay).

The mapping rule (`map_routes`), stated once:
- layers: target MoE layer j replays source MoE layer j mod L_src;
- experts: with R = ceil(K_tgt / K_src), source expert e's r-th replica is target expert
  perm_j[(e + r * floor(E_tgt / R)) mod E_tgt], perm_j a seeded permutation of the target's E_tgt
  experts, one per target layer; a token's K_tgt target experts are its K_src source experts' replicas
  taken in the order (replica 0 of every source pick, in the source's rank order, then replica 1, ...),
  the first K_tgt distinct ones (further replicas only where earlier ones collided, then the lowest
  free ids where every replica collided). E_tgt >= E_src is
  required (a target with fewer experts than its source would merge experts and invent hits);
- tokens: request i of the target replays request i mod B_src of the source (B_src requests were
  recorded), so a request keeps its routes across micro-batches; in the prompt step its position p
  takes the source prompt's position p mod S_src; decode step s takes source decode step s, cycling
  through the recorded decode steps when the target decodes longer than the source was recorded;
- predictions: the source's lookahead guesses (the next layers' routers applied to each token's hidden
  state) are recorded per token and mapped by the same rule; target layer j's guess for layer j + d is
  the source's depth-d guess for the layer j + d replays, where the source made one (not across the
  source's last layer: there the target predicts nothing, as lookahead cannot see past a step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..cache.predictor import LookaheadPredictor, RouterSpec, lookahead_scores
from ._checks import check_depth


@dataclass
class RouteRecording:
    """Per forward step (the prompt, then each decode step) and MoE layer, every token's experts
    [T, K] in the router's rank order, and its lookahead guesses per depth (or None)."""

    source: str
    batch: int
    num_layers: int
    num_experts: int
    top_k: int
    depth: int
    routes: list = field(default_factory=list)       # routes[s][layer] = LongTensor [T, K]
    predictions: list = field(default_factory=list)  # predictions[s][layer][d - 1] = LongTensor [T, K] or None


def record_token_routes(model, input_ids: torch.Tensor, experts: list, routers: list, *, max_new_tokens: int,
                        depth: int = 1, source: str = "", attention_mask: torch.Tensor | None = None) -> RouteRecording:
    """Greedy-generate with a patched model and record, per token, the experts each MoE layer used and
    what lookahead gating (routers of the next `depth` layers on this layer's input) guessed for them.
    experts / routers: moecache.patched_experts(model) / moecache.routers(model)."""
    if not experts:
        raise ValueError("record_token_routes: no MoE layers given (patch the model, then pass "
                         "moecache.patched_experts(model))")
    if any(getattr(router, "zero_experts", 0) for router in routers):
        raise ValueError("record_token_routes: this model's routers rank zero-computation experts (LongCat-Flash), "
                         "whose routes reach the experts as real experts of weight 0; a recording would count "
                         "them as used")
    index = {id(m): i for i, m in enumerate(experts)}
    recording = RouteRecording(source, int(input_ids.shape[0]), len(experts), experts[0].num_experts, 0, depth)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
        layer = index[id(module)]
        if layer == 0:
            recording.routes.append([None] * recording.num_layers)
            recording.predictions.append([[None] * depth for _ in range(recording.num_layers)])
        recording.top_k = int(ids.shape[1])
        step = len(recording.routes) - 1
        recording.routes[step][layer] = ids.long().cpu()
        for d in range(1, depth + 1):
            target = layer + d
            if target >= len(routers):
                break
            if not isinstance(routers[target], RouterSpec):  # none, or one that picks by token id: no guess
                continue
            scores = lookahead_scores(routers, layer, target, hidden)
            recording.predictions[step][target][d - 1] = scores.topk(recording.top_k, dim=1).indices.cpu()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in experts]
    try:
        with torch.no_grad():
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return recording


@dataclass
class MappedRoutes:
    """A recording mapped onto a target of `num_layers` MoE layers, `num_experts` experts, top-`top_k`."""

    recording: RouteRecording
    num_layers: int
    num_experts: int
    top_k: int
    permutations: torch.Tensor  # [num_layers, num_experts]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} must lie in [0, num_layers={self.num_layers})")

    def _step(self, step: int) -> int:
        n = len(self.recording.routes)
        if step < n:
            return step
        if n == 1:
            raise ValueError("the recording holds the prompt step only: record at least one decode step "
                             "(max_new_tokens >= 2) to replay decode steps")
        return 1 + (step - 1) % (n - 1)

    def _rows(self, step: int, requests: list[int], rows: int) -> torch.Tensor:
        """Source rows for a target forward over `requests` (their tokens flattened, `rows` in all)."""
        if not requests or rows % len(requests):
            raise ValueError(f"rows={rows} must be a whole number of tokens for each of the {len(requests)} "
                             "requests")
        per_request = rows // len(requests)
        source_batch = self.recording.batch
        req = torch.tensor(requests).repeat_interleave(per_request) % source_batch
        if step == 0:
            source_len = self.recording.routes[0][0].shape[0] // source_batch
            pos = torch.arange(per_request).repeat(len(requests)) % source_len
            return req * source_len + pos
        return req

    def _map(self, source_ids: torch.Tensor, layer: int) -> torch.Tensor:
        E_tgt, K = self.num_experts, self.top_k
        replicas = -(-K // source_ids.shape[1])
        offset = max(1, E_tgt // replicas)
        candidates = torch.cat([(source_ids + r * offset) % E_tgt for r in range(replicas)], dim=1)
        out = candidates[:, :K].clone()
        sorted_ids = out.sort(dim=1).values
        clashes = torch.nonzero((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(dim=1)).reshape(-1)
        for i in clashes.tolist():  # replicas collided: further replicas, then the lowest free ids
            row = source_ids[i].tolist()
            picked: list[int] = []
            for r in range(E_tgt):
                picked += [c for c in dict.fromkeys((e + r * offset) % E_tgt for e in row) if c not in picked]
                if len(picked) >= K:
                    break
            picked += [x for x in range(E_tgt) if x not in picked][:max(K - len(picked), 0)]
            out[i] = torch.tensor(picked[:K])
        return self.permutations[layer][out]

    def routes(self, step: int, layer: int, requests: list[int], rows: int) -> torch.Tensor:
        """[rows, top_k] target experts of target layer `layer` at forward step `step` (0: the prompt) for a
        forward over `requests` (target request indices) with `rows` tokens in all."""
        self._check_layer(layer)
        s = self._step(step)
        source = self.recording.routes[s][layer % self.recording.num_layers]
        return self._map(source[self._rows(s, requests, rows)], layer)

    def prediction(self, step: int, layer: int, depth: int, requests: list[int], rows: int) -> torch.Tensor | None:
        """[rows, top_k] experts guessed for target layer `layer` from `depth` layers before it, or None."""
        self._check_layer(layer)
        check_depth(depth)
        source_layer = layer % self.recording.num_layers
        if depth > self.recording.depth or source_layer - depth < 0:
            return None
        s = self._step(step)
        guess = self.recording.predictions[s][source_layer][depth - 1]
        return None if guess is None else self._map(guess[self._rows(s, requests, rows)], layer)


def map_routes(recording: RouteRecording, num_layers: int, num_experts: int, top_k: int, *,
               seed: int | None = 0) -> MappedRoutes:
    """Map `recording` onto a target's MoE layers and experts by the rule in the module docstring
    (seed None: identity permutations, so a model replaying its own recording routes as it did)."""
    if num_experts < recording.num_experts:
        raise ValueError(f"num_experts={num_experts}: the target has fewer experts than the recorded source "
                         f"({recording.num_experts}); mapping would merge experts and invent hits")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must lie in [1, num_experts={num_experts}]")
    if not recording.routes:
        raise ValueError("the recording holds no steps")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if recording.batch < 1 or recording.num_experts < 1:
        raise ValueError(f"the recording holds {recording.batch} requests of {recording.num_experts} experts; "
                         "it needs at least one of each")
    if seed is None:
        permutations = torch.arange(num_experts).repeat(num_layers, 1)
    else:
        generator = torch.Generator().manual_seed(seed)
        permutations = torch.stack([torch.randperm(num_experts, generator=generator) for _ in range(num_layers)])
    return MappedRoutes(recording, num_layers, num_experts, top_k, permutations)


class RoutingReplay:
    """Replays mapped routes into a patched model's experts modules (moecache.patched_experts(model)) while
    active: each module's top-k ids are replaced by the mapped source routes of the current forward step.
    When the experts are offloaded with a predictor (policy "predictive") and `predictions` is set, its
    guesses are replaced by the mapped source guesses, so predictions and routes come from the same
    trained model. A forward of `model` over more than one token per row is a prompt step (step 0), each
    other forward the next decode step. `requests` names the target requests of the coming forwards
    (default: its rows in order); set it per micro-batch (generate_scheduled's before_group). Use as a
    context manager."""

    def __init__(self, model, experts: list, mapped: MappedRoutes, *, predictions: bool = True):
        if len(experts) != mapped.num_layers:
            raise ValueError(f"the routes were mapped onto {mapped.num_layers} MoE layers, the model has {len(experts)}")
        providers = [getattr(m, "provider", None) for m in experts]
        offloaded = [p for p in providers if p is not None]
        predictor = getattr(offloaded[0], "predictor", None) if predictions and offloaded else None
        if predictor is not None and len(offloaded) < len(providers):
            raise ValueError("RoutingReplay: the predictor numbers the offloaded layers, and this model keeps some "
                             "resident (experts of another shape): replay with predictions=False")
        self.experts, self.mapped, self.model = experts, mapped, model
        self.predictor: LookaheadPredictor | None = predictor
        self.index = {id(m): i for i, m in enumerate(experts)}
        self.step = -1
        self.batch: int | None = None
        self.requests: list[int] | None = None
        self.handles: list = []
        self.memo: dict = {}  # (kind, step, layer, depth, requests, rows, device) -> ids, so replays repeat cheaply

    def reset(self) -> None:
        self.step = -1

    def _forward(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self.step = 0 if ids.shape[1] > 1 else self.step + 1
        self.batch = int(ids.shape[0])

    def _requests(self, rows: int) -> list[int]:
        return self.requests if self.requests is not None else list(range(self.batch))

    def _lookup(self, kind, layer, depth, rows, device):
        requests = self._requests(rows)
        key = (kind, self.step, layer, depth, tuple(requests), rows, device)
        if key not in self.memo:
            if kind == "routes":
                value = self.mapped.routes(self.step, layer, requests, rows)
            else:
                value = self.mapped.prediction(self.step, layer, depth, requests, rows)
            self.memo[key] = None if value is None else value.to(device)
        return self.memo[key]

    def prepare(self, groups: list[list[int]], prompt_length: int, new_tokens: int, device) -> None:
        """Map ahead of time every route and guess that forwards over `groups` (lists of target requests) with
        prompts of `prompt_length` positions generating `new_tokens` will ask for, so that timed runs spend
        no host time mapping."""
        saved = self.step, self.requests
        for group in groups:
            self.requests = list(group)
            for step in range(new_tokens):
                self.step = step
                rows = len(group) * (prompt_length if step == 0 else 1)
                for layer in range(self.mapped.num_layers):
                    self._lookup("routes", layer, 0, rows, torch.device(device))
                    for d in range(1, (self.predictor.depth if self.predictor else 0) + 1):
                        self._lookup("prediction", layer, d, rows, torch.device("cpu"))
        self.step, self.requests = saved

    def _hook(self, module, args, kwargs):
        layer = self.index[id(module)]
        hidden = args[0] if args else kwargs["hidden_states"]
        ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
        weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        if ids.shape[1] != self.mapped.top_k:
            raise ValueError(f"layer {layer} routes top-{ids.shape[1]}; the routes were mapped for top-{self.mapped.top_k}")
        replayed = self._lookup("routes", layer, 0, ids.shape[0], ids.device).to(dtype=ids.dtype)
        return (hidden, replayed, weights), {}

    def _predict(self, layer: int, hidden_states: torch.Tensor, top_k: int):
        predictor = self.predictor
        start = time.perf_counter()
        out = []
        for d in range(1, predictor.depth + 1):
            target = layer + d
            if target >= self.mapped.num_layers:
                break
            guess = self._lookup("prediction", target, d, hidden_states.shape[0], torch.device("cpu"))
            if guess is None:
                continue
            counts = torch.bincount(guess.reshape(-1), minlength=self.mapped.num_experts)
            predictor.pending[(target, d)] = set(torch.nonzero(counts).reshape(-1).tolist())
            out.append((target, d, counts))
        predictor.seconds += time.perf_counter() - start
        return out

    def __enter__(self):
        self.reset()
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.experts]
        self.handles.append(self.model.register_forward_pre_hook(self._forward, with_kwargs=True))
        if self.predictor is not None:
            self.predictor.predict = self._predict  # the instance attribute shadows the method until __exit__
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.predictor is not None:
            self.predictor.__dict__.pop("predict", None)
