"""XMem's memory: working memory, long-term memory and the consolidation between them.

Written for this project after the description in the XMem paper and the public
reference implementation (hkchengrex/XMem, `inference/memory_manager.py` and
`inference/kv_memory_store.py`). Simplification: all objects are given on the
first frame, so every memory element has a value for every object (XMem's
"one object group" case, which is the DAVIS / single-prompt case we need).

Deliberate differences from the reference, none of which changes a result that the
reference computes without error:
- the top-k softmax subtracts the maximum (the reference exponentiates raw similarities,
  which gives 0/0 with untrained weights); this can flip top-k picks among exact ties;
- top_k and num_prototypes are capped at the number of available elements (tiny frames
  have fewer than 30 elements per frame; the reference would fail);
- trimming long-term memory keeps exactly the `max_long_term_elements - num_prototypes`
  most-used elements (the reference also drops elements tied with the cut-off), and, when
  usage is not counted, keeps the newest (the reference raises).

Shapes: a memory holds N elements (one per feature-map position of a memory
frame): keys (1, Ck, N), shrinkage (1, 1, N), selection (1, Ck, N) or None,
values (num_objects, Cv, N).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

# --------------------------------------------------------------------------------------------
# Configuration (XMem's own option names and defaults, DESIGN 1 "Masks")
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryConfig:
    mem_every: int = 5  # r: a frame joins working memory every r frames
    deep_update_every: int = -1  # < 0: deep (value-encoder) hidden update on memory frames
    top_k: int = 30  # softmax over the k best-matching memory elements only
    min_mid_term_frames: int = 5  # T_min: frames left in working memory after consolidation
    max_mid_term_frames: int = 10  # T_max: working memory size that triggers consolidation
    num_prototypes: int = 128  # P: long-term elements made per consolidation
    max_long_term_elements: int = 10000  # LT_max: long-term cap; least-used are dropped
    enable_long_term: bool = True
    # None: decide like XMem's eval.py from the video length (count only when the cap can be hit).
    enable_long_term_count_usage: bool | None = None

    @classmethod
    def from_kwargs(cls, options: dict, num_frames: int | None = None) -> MemoryConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown XMem memory option(s) {unknown}; known: {sorted(names)}")
        cfg = cls(**options)
        cfg.validate()
        if cfg.enable_long_term_count_usage is None:
            count = False
            if cfg.enable_long_term and num_frames is not None:
                span = cfg.max_mid_term_frames - cfg.min_mid_term_frames
                count = num_frames / span * cfg.num_prototypes >= cfg.max_long_term_elements
            elif cfg.enable_long_term:
                count = True  # unknown length: be safe, the cap may be reached
            cfg = replace(cfg, enable_long_term_count_usage=count)
        return cfg

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"XMem memory config: {msg}")

        need(self.mem_every >= 1, f"mem_every must be >= 1, got {self.mem_every}")
        need(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        if self.enable_long_term:
            need(self.min_mid_term_frames >= 1, "min_mid_term_frames must be >= 1")
            need(
                self.max_mid_term_frames > self.min_mid_term_frames,
                f"max_mid_term_frames ({self.max_mid_term_frames}) must exceed "
                f"min_mid_term_frames ({self.min_mid_term_frames})",
            )
            need(self.num_prototypes >= 1, "num_prototypes must be >= 1")
            need(
                self.max_long_term_elements > self.num_prototypes,
                f"max_long_term_elements ({self.max_long_term_elements}) must exceed "
                f"num_prototypes ({self.num_prototypes})",
            )


# --------------------------------------------------------------------------------------------
# Similarity and top-k softmax
# --------------------------------------------------------------------------------------------


def similarity(
    mem_key: torch.Tensor,
    mem_shrinkage: torch.Tensor | None,
    query_key: torch.Tensor,
    query_selection: torch.Tensor | None,
) -> torch.Tensor:
    """Anisotropic negative squared L2 similarity of XMem, (1, N, Q).

    With selection e: -sum_c e_c (k_c - q_c)^2, expanded so no (N, Q, C) tensor is formed;
    without it the query-only term is dropped (it cancels in the softmax over N).
    Scaled by the memory's shrinkage and 1/sqrt(Ck).
    """
    ck = mem_key.shape[1]
    mk = mem_key.transpose(1, 2)  # (1, N, Ck)
    # Terms are summed in the reference's order: top-k picks among near-equal similarities
    # then agree with it bit for bit.
    if query_selection is not None:
        a_sq = mk.pow(2) @ query_selection
        two_ab = 2 * (mk @ (query_key * query_selection))
        b_sq = (query_selection * query_key.pow(2)).sum(1, keepdim=True)
        sim = -a_sq + two_ab - b_sq
    else:
        sim = -mk.pow(2).sum(2, keepdim=True) + 2 * (mk @ query_key)
    if mem_shrinkage is not None:
        sim = sim * mem_shrinkage.transpose(1, 2)
    return sim / math.sqrt(ck)


def topk_softmax(sim: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Softmax over memory (dim 1), keeping only the top_k entries per query (others exactly 0).

    The max is subtracted first: with untrained weights the similarities can be so negative
    that exp() underflows to 0/0 otherwise. k is capped at N (tiny feature maps can hold fewer
    than top_k elements).
    """
    if top_k is None or top_k >= sim.shape[1]:
        return torch.softmax(sim, dim=1)
    vals, idx = torch.topk(sim, k=top_k, dim=1)
    weights = torch.softmax(vals, dim=1)
    return torch.zeros_like(sim).scatter_(1, idx, weights)


# --------------------------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------------------------


class KeyValueStore:
    """Keys, shrinkage, selection, values and (optionally) usage statistics of one memory."""

    def __init__(self, count_usage: bool):
        self.count_usage = count_usage
        self.key: torch.Tensor | None = None
        self.shrinkage: torch.Tensor | None = None
        self.selection: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.use_count: torch.Tensor | None = None
        self.life_count: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.key is None else self.key.shape[-1]

    def engaged(self) -> bool:
        return self.key is not None

    @staticmethod
    def _cat(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
        if new is None:
            return old
        return new if old is None else torch.cat([old, new], dim=-1)

    def add(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        shrinkage: torch.Tensor | None,
        selection: torch.Tensor | None,
    ) -> None:
        n = key.shape[-1]
        self.key = self._cat(self.key, key)
        self.value = self._cat(self.value, value)
        self.shrinkage = self._cat(self.shrinkage, shrinkage)
        self.selection = self._cat(self.selection, selection)
        if self.count_usage:
            self.use_count = self._cat(self.use_count, key.new_zeros(1, 1, n))
            # Tiny initial life avoids 0/0 for brand-new elements.
            self.life_count = self._cat(self.life_count, key.new_full((1, 1, n), 1e-7))

    def update_usage(self, usage: torch.Tensor) -> None:
        if self.count_usage:
            self.use_count += usage.view_as(self.use_count)
            self.life_count += 1

    def usage(self) -> torch.Tensor:
        if not self.count_usage:
            raise RuntimeError("this memory does not count usage")
        return self.use_count / self.life_count

    def _map(self, fn) -> None:
        for name in ("key", "shrinkage", "selection", "value", "use_count", "life_count"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def keep_outside(self, start: int, end: int) -> None:
        """Drop elements [start, end) (end > start, both non-negative)."""
        self._map(lambda t: torch.cat([t[..., :start], t[..., end:]], dim=-1))

    def keep_indices(self, idx: torch.Tensor) -> None:
        self._map(lambda t: t[..., idx])

    def remove_least_used(self, max_size: int) -> None:
        """Shrink to max_size elements, keeping the most used (usage / life), in order."""
        if self.size <= max_size:
            return
        if self.count_usage:
            keep = torch.topk(self.usage().flatten(), k=max_size).indices.sort().values
        else:
            # Usage not counted: fall back to keeping the newest elements.
            keep = torch.arange(self.size - max_size, self.size, device=self.key.device)
        self.keep_indices(keep)


# --------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------


class MemoryManager:
    """Working memory + long-term memory + sensory (hidden) memory of one video.

    Working memory: the first memory frame stays forever; later memory frames are appended.
    When it reaches max_mid_term_frames frames, everything except the first frame and the
    newest (min_mid_term_frames - 1) frames is consolidated into num_prototypes long-term
    prototypes (the most used keys; values/shrinkage read out from the candidates with them
    as queries, "memory potentiation"), then removed from working memory.
    """

    def __init__(self, config: MemoryConfig, hidden_dim: int):
        self.config = config
        self.hidden_dim = hidden_dim
        self.top_k = config.top_k
        self.enable_long_term = config.enable_long_term
        self.work_mem = KeyValueStore(count_usage=config.enable_long_term)
        self.long_mem = KeyValueStore(count_usage=bool(config.enable_long_term_count_usage))
        self.hw: int | None = None  # elements per memory frame, known at the first add
        self.hidden: torch.Tensor | None = None
        self.consolidations = 0  # how many times working memory was compressed (for tests, logs)

    # -- readout ---------------------------------------------------------------------------

    def match_memory(self, query_key: torch.Tensor, query_selection: torch.Tensor | None) -> torch.Tensor:
        """query (1, Ck, h, w) -> readout (num_objects, Cv, h, w)."""
        h, w = query_key.shape[-2:]
        qk = query_key.flatten(2)
        qe = query_selection.flatten(2) if query_selection is not None else None
        wm, lm = self.work_mem, self.long_mem
        use_long = self.enable_long_term and lm.engaged()
        if use_long:
            keys = torch.cat([lm.key, wm.key], -1)
            shrink = torch.cat([lm.shrinkage, wm.shrinkage], -1)
            values = torch.cat([lm.value, wm.value], -1)
        else:
            keys, shrink, values = wm.key, wm.shrinkage, wm.value

        affinity = topk_softmax(similarity(keys, shrink, qk, qe), self.top_k)  # (1, N, Q)
        if self.enable_long_term:
            # Usage = total attention an element received from this frame's queries.
            usage = affinity.sum(dim=2).flatten()
            n_long = lm.size if use_long else 0
            wm.update_usage(usage[n_long:])
            if use_long:
                lm.update_usage(usage[:n_long])
        readout = values @ affinity  # (num_objects, Cv, Q)
        return readout.view(values.shape[0], values.shape[1], h, w)

    # -- writing ---------------------------------------------------------------------------

    def add_memory(
        self,
        key: torch.Tensor,
        shrinkage: torch.Tensor,
        value: torch.Tensor,
        selection: torch.Tensor | None = None,
    ) -> None:
        """key (1, Ck, h, w), shrinkage (1, 1, h, w), value (1, num_objects, Cv, h, w)."""
        if self.hw is None:
            self.hw = key.shape[-2] * key.shape[-1]
        sel = selection.flatten(2) if (selection is not None and self.enable_long_term) else None
        self.work_mem.add(key.flatten(2), value[0].flatten(2), shrinkage.flatten(2), sel)

        if self.enable_long_term and self.work_mem.size >= self.config.max_mid_term_frames * self.hw:
            cap = self.config.max_long_term_elements - self.config.num_prototypes
            if self.long_mem.size >= cap:
                self.long_mem.remove_least_used(cap)
            self._consolidate()

    def _consolidate(self) -> None:
        hw = self.hw
        wm = self.work_mem
        # Candidates: everything after the permanent first frame and before the newest
        # (min_mid_term_frames - 1) frames.
        start, end = hw, wm.size - (self.config.min_mid_term_frames - 1) * hw
        if end <= start:
            return
        cand_key = wm.key[..., start:end]
        cand_shrink = wm.shrinkage[..., start:end]
        cand_sel = wm.selection[..., start:end] if wm.selection is not None else None
        cand_value = wm.value[..., start:end]
        usage = wm.usage()[..., start:end].flatten()

        # Prototypes: the most used candidates (capped at the number of candidates).
        k = min(self.config.num_prototypes, usage.numel())
        proto_idx = torch.topk(usage, k=k, sorted=True).indices
        proto_key = cand_key[..., proto_idx]
        proto_sel = cand_sel[..., proto_idx] if cand_sel is not None else None
        # Potentiation: prototypes query the candidates; plain softmax (no top-k).
        aff = topk_softmax(similarity(cand_key, cand_shrink, proto_key, proto_sel), None)  # (1, Nc, P)
        proto_value = cand_value @ aff
        proto_shrink = cand_shrink @ aff

        wm.keep_outside(start, end)
        self.long_mem.add(proto_key, proto_value, proto_shrink, None)
        self.consolidations += 1

    # -- sensory memory --------------------------------------------------------------------

    def create_hidden_state(self, num_objects: int, sample_key: torch.Tensor) -> None:
        h, w = sample_key.shape[-2:]
        if self.hidden_dim > 0:
            self.hidden = sample_key.new_zeros(1, num_objects, self.hidden_dim, h, w)

    @property
    def work_mem_frames(self) -> int:
        return 0 if self.hw is None else self.work_mem.size // self.hw
