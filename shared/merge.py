"""Merge maths on adapter states: pure, side-effect-free functions of ``dict[str, Tensor]``.

Everything is computed in float64 and returned in the global (or first) state's dtype; inputs
are never modified. Strategies (``cloud/strategies``) are thin classes around these functions.

Fisher merging (Matena & Raffel 2022) is done in *delta space* around the global value::

    θ_new = θ_g + Σ_k λ_k F_k Δ_k / (Σ_k λ_k F_k + ε)            (elementwise)

Merging parameters directly (``θ = Σ λ F θ / (Σ λ F + ε)``) pulls every parameter on which all
devices have ~0 Fisher toward zero; in delta space such a parameter keeps its global value.

**ε is relative to the Fisher's scale.** Diagonal Fisher values of adapter parameters range from
~1e-10 to ~1e-2 depending on the loss, batch and data, so an absolute ε = 1e-8 would dwarf a
small Fisher and silently turn the merge into "keep the global value" everywhere. The
denominator therefore gets ``eps * mean(Σ_k λ_k F_k)`` (the mean over every element of every
key): the merge is invariant to a common rescaling of all Fishers, and ε only matters on elements
whose combined Fisher is ~``eps`` times below typical, where the merged delta shrinks toward 0
(the global value). Where the combined Fisher is exactly 0 the global value is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from shared.adapters import AdapterState

NORMALIZATIONS = (None, "mean", "max", "l2")


def sample_weights(n_samples: Sequence[int]) -> list[float]:
    """FedAvg weights ``λ_k = n_k / N`` from each client's sample count (all must be > 0)."""
    if len(n_samples) == 0:
        raise ValueError(f"need at least one client, got n_samples={list(n_samples)!r}")
    for n in n_samples:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"sample counts must be positive integers, got {list(n_samples)!r}")
    total = sum(n_samples)
    return [n / total for n in n_samples]


def weighted_average(deltas: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """``Σ_k λ_k Δ_k`` per key; ``weights`` are normalised to sum to 1.

    Keys, shapes and dtypes follow ``deltas[0]``; every delta must match it and be finite.
    """
    lam = normalized_weights(weights, len(deltas))
    _check_states(deltas, deltas[0], "delta")
    return {
        key: _combine(lam, [d[key] for d in deltas]).to(ref.dtype) for key, ref in deltas[0].items()
    }


class DeltaAccumulator:
    """Streaming ``weighted_average``: ``add`` one client's delta at a time, memory flat in the
    client count.

    Keeps ``Σ λ Δ`` in one flat float64 buffer (``total`` holds per-key views of it); each
    element is summed as ``total + λ·Δ`` in client order, the operations of
    ``weighted_average``, so the same weights (``normalized_weights``) give the same bits.
    Weights are used as given: normalise them first for a mean.
    """

    def __init__(self, reference: AdapterState) -> None:
        self.reference = reference
        self._layout = _FlatLayout(reference)
        self._total = self._layout.zeros()  # Σ λ Δ, (P,)
        self.total = self._layout.views(self._total)
        self.count = 0

    def add(self, delta: AdapterState, weight: float, name: str = "client") -> None:
        """Fold one client's delta in with weight λ (finite, >= 0)."""
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name}: weight must be finite and >= 0, got {weight!r}")
        d = self._layout.flatten(delta, f"{name} delta")  # (P,) float64
        self._total += weight * d  # not add_(alpha=): that may fuse into one rounding
        self.count += 1

    def sums(self) -> dict[str, object]:
        """The running sum and count as plain values (numpy, int), to send to another process
        that ``absorb``s them."""
        return {"total": self._total.numpy().copy(), "count": self.count}

    def absorb(self, sums: dict[str, object]) -> None:
        """Add another accumulator's ``sums`` (same reference) to this one's: a shard of the
        clients folded elsewhere. Shards absorbed in a fixed order give the same bits every
        time; the order of additions differs from one sequential fold, so the result may
        differ from it in the last bits of the float64 sums."""
        total, count = _flat_sum(sums, "total", self._layout.numel), _count(sums)
        self._total += total
        self.count += count

    def merged_delta(self) -> AdapterState:
        """``Σ λ Δ`` in the reference's dtypes."""
        if self.count == 0:
            raise ValueError("need at least one client update")
        return {key: self.total[key].to(ref.dtype) for key, ref in self.reference.items()}


def fisher_weighted_merge(
    global_state: AdapterState,
    deltas: Sequence[AdapterState],
    fishers: Sequence[AdapterState],
    weights: Sequence[float],
    eps: float = 1e-8,
    normalize: str | None = None,
    floor: float = 0.0,
    fallback: float = 0.0,
) -> AdapterState:
    """FedNano's Fisher merge in delta space: ``θ_g + Σ λ F Δ / (Σ λ F + ε)`` elementwise.

    ``weights`` (λ_k, e.g. from ``sample_weights``) are normalised to sum to 1. ``eps`` is
    relative to the mean combined Fisher (see the module docstring). ``normalize`` divides each
    client's Fisher by its own ``"mean"``, ``"max"`` or ``"l2"`` norm over all keys first, so
    that one client's Fisher scale does not dominate; a client whose Fisher is all zeros stays
    all zeros. ``floor`` raises each client's (normalised) Fisher to at least ``floor`` times its
    own mean, so no client's weight on an element falls to ~0 from a noisy 32-sample estimate.
    ``fallback``: where ``Σ λ F`` is below ``fallback`` times its mean, the merged step is the
    plain weighted mean ``Σ λ Δ`` (FedAvg) instead of shrinking toward the global value.
    """
    if len(fishers) != len(deltas):
        raise ValueError(f"got {len(deltas)} deltas but {len(fishers)} fishers")
    lam = normalized_weights(weights, len(deltas))
    _check_states([global_state], global_state, "global state")
    merger = FisherAccumulator(global_state, normalize=normalize, floor=floor)
    for index, (delta, fisher) in enumerate(zip(deltas, fishers, strict=True)):
        merger.add(delta, fisher, float(lam[index]), name=f"client {index}")
    return apply_delta(global_state, merger.merged_delta(eps=eps, fallback=fallback))


class FisherAccumulator:
    """Streaming Fisher merge: ``add`` one client at a time, memory flat in the client count.

    Keeps ``Σ λ F̃ Δ``, ``Σ λ F̃`` and ``Σ λ Δ`` in float64 (F̃: the client's Fisher after
    ``normalize`` and ``floor``, see ``fisher_weighted_merge``); weights need not sum to 1.
    All keys live in one flat buffer per sum (``num``, ``mass`` and ``plain`` are per-key views
    of it), so folding a client in costs a handful of tensor operations whatever the number of
    keys; every element is still summed in client order, as a per-key loop would.
    """

    def __init__(
        self, reference: AdapterState, *, normalize: str | None = None, floor: float = 0.0
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not (math.isfinite(floor) and floor >= 0):
            raise ValueError(f"floor must be finite and >= 0, got {floor!r}")
        self.reference = reference
        self.normalize = normalize
        self.floor = floor
        self._layout = _FlatLayout(reference)
        self._num = self._layout.zeros()  # Σ λ F̃ Δ, (P,)
        self._mass = self._layout.zeros()  # Σ λ F̃, (P,)
        self._plain = self._layout.zeros()  # Σ λ Δ, (P,)
        self.num = self._layout.views(self._num)
        self.mass = self._layout.views(self._mass)
        self.plain = self._layout.views(self._plain)
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: AdapterState, fisher: AdapterState, weight: float,
            name: str = "client") -> None:
        """Fold one client's delta and Fisher in with weight λ (finite, >= 0)."""
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name}: weight must be finite and >= 0, got {weight!r}")
        d = self._layout.flatten(delta, f"{name} delta")  # (P,) float64
        scales = self.normalize is not None or self.floor != 0.0
        f, total = self._layout.flatten_fisher(fisher, f"{name} fisher", own=scales)  # and Σ F
        if scales:
            self._scale(f, total)
        self._num.addcmul_(f, d, value=weight)
        self._mass.add_(f, alpha=weight)
        self._plain.add_(d, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def _scale(self, fisher: torch.Tensor, total: float) -> None:  # (P,), in place
        """F̃: the client's Fisher divided by its own ``normalize`` norm, then raised to
        ``floor`` times its own mean. ``total`` is the Fisher's sum, so the mean and the
        ``"mean"`` norm cost no pass of their own; the L2 norm is one pass."""
        if self.normalize is not None:
            scale = _fisher_scale(fisher, total, self.normalize)
            if scale != 0.0:  # an all-zero Fisher stays all zeros
                fisher.div_(scale)
                total /= scale
        if self.floor != 0.0 and self._layout.numel:
            fisher.clamp_(min=self.floor * (total / self._layout.numel))

    def sums(self) -> dict[str, object]:
        """The running sums, total weight and count as plain values (numpy, float, int), to
        send to another process that ``absorb``s them."""
        return {"num": self._num.numpy().copy(), "mass": self._mass.numpy().copy(),
                "plain": self._plain.numpy().copy(), "total_weight": self.total_weight,
                "count": self.count}

    def absorb(self, sums: dict[str, object]) -> None:
        """Add another accumulator's ``sums`` (same reference and options) to this one's: a
        shard of the clients folded elsewhere (see ``DeltaAccumulator.absorb``)."""
        numel = self._layout.numel
        num, mass = _flat_sum(sums, "num", numel), _flat_sum(sums, "mass", numel)
        plain, count = _flat_sum(sums, "plain", numel), _count(sums)
        weight = sums.get("total_weight")
        if isinstance(weight, bool) or not isinstance(weight, float) or not math.isfinite(weight):
            raise ValueError(f"a shard's total_weight must be a finite float, got {weight!r}")
        self._num += num  # everything checked first: a bad shard changes nothing
        self._mass += mass
        self._plain += plain
        self.total_weight += weight
        self.count += count

    def merged_delta(self, eps: float = 1e-8, fallback: float = 0.0) -> AdapterState:
        """The merged step ``Σ λ F̃ Δ / (Σ λ F̃ + ε)`` (FedAvg where the mass is below
        ``fallback`` times its mean), in the reference's dtypes."""
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
        if not (math.isfinite(fallback) and fallback >= 0):
            raise ValueError(f"fallback must be finite and >= 0, got {fallback!r}")
        if self.count == 0 or self.total_weight <= 0:
            raise ValueError("need at least one client update with a positive weight")
        mean_mass = _mean_over_keys(self.mass)
        eps_abs, low = eps * mean_mass, fallback * mean_mass
        merged = {}
        for key, ref in self.reference.items():
            den = self.mass[key] + eps_abs
            # den == 0 only where every λF is 0, hence num == 0 too: the global value is kept.
            step = self.num[key] / torch.where(den > 0, den, torch.ones_like(den))
            if fallback > 0:
                step = torch.where(self.mass[key] < low, self.plain[key] / self.total_weight,
                                   step)
            merged[key] = step.to(ref.dtype)
        return merged


class _FlatLayout:
    """The keys and shapes of a reference state laid end to end in one flat float64 vector."""

    def __init__(self, reference: AdapterState) -> None:
        self.reference = reference
        self.shapes = {key: tuple(value.shape) for key, value in reference.items()}
        self.numel = sum(value.numel() for value in reference.values())
        self.device = next(iter(reference.values())).device if reference else None
        self.offsets: dict[str, int] = {}  # where each key starts in the flat vector
        start = 0
        for key, shape in self.shapes.items():
            self.offsets[key] = start
            start += math.prod(shape)

    def zeros(self) -> torch.Tensor:  # (P,)
        return torch.zeros(self.numel, dtype=torch.float64, device=self.device)

    def views(self, flat: torch.Tensor) -> AdapterState:
        """Per-key views of a flat (P,) vector, in the reference's shapes (no copies)."""
        views, start = {}, 0
        for key, shape in self.shapes.items():
            size = math.prod(shape)
            views[key] = flat[start:start + size].view(shape)
            start += size
        return views

    def flatten(self, state: AdapterState, what: str) -> torch.Tensor:
        """The state as one float64 (P,) vector, checked like ``_check_states`` (same errors).

        Fast path: the keys and shapes are compared in Python and the values with one
        reduction (a finite sum means every value is finite); anything odd goes through
        ``_check_states`` for the precise error.
        """
        flat = self._gathered(state, own=False)
        if flat is not None and _all_finite(flat):
            return flat
        _check_states([state], self.reference, what)
        return self._concatenated(state)

    def flatten_fisher(self, state: AdapterState, what: str,
                       own: bool = True) -> tuple[torch.Tensor, float]:
        """A Fisher as one float64 (P,) vector and its sum, checked like
        ``_check_states(nonnegative=True)``: the sum, finite, says every value is finite and is
        the one the merge needs; a min >= 0 that nothing is negative. With ``own`` the vector
        is a copy of the caller's to scale in place. The sum is numpy's (pairwise, on one
        thread), so it has the same bits in any process whatever its thread count."""
        flat = self._gathered(state, own=own)
        if flat is not None:
            values = flat.numpy()
            with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf: the slow path says
                total = float(values.sum())
            if math.isfinite(total) and values.min() >= 0:
                return flat, total
        _check_states([state], self.reference, what, nonnegative=True)
        flat = self._concatenated(state)
        with np.errstate(over="ignore"):
            total = float(flat.numpy().sum())
        if not math.isfinite(total):  # finite values whose sum overflows float64
            raise ValueError(f"{what}: the Fisher's values sum beyond float64's range")
        return flat, total

    def _gathered(self, state: AdapterState, own: bool) -> torch.Tensor | None:
        """The state's values as one float64 (P,) vector when its keys and shapes fit the
        layout (None otherwise; the values are not checked): the decoder's own flat vector
        when it is one (a copy of it with ``own``), else the keys concatenated."""
        if not self._fits(state):
            return None
        base = self._laid_out(state)
        if base is None:
            return torch.cat([state[key].reshape(-1) for key in self.shapes]).double()
        return base.to(torch.float64, copy=True) if own else base.double()

    def _concatenated(self, state: AdapterState) -> torch.Tensor:  # (P,), a new tensor
        if not self.shapes:
            return self.zeros()
        return torch.cat([state[key].reshape(-1).double() for key in self.shapes])

    def _laid_out(self, state: AdapterState) -> torch.Tensor | None:
        """The one flat vector every value of ``state`` is a view of, laid out as this layout
        lays its keys out (what ``shared.codec.decode`` returns: views of one decoded array,
        in the header's order), or None. Its ``double()`` is the ``cat``'s, without the copy."""
        first = state[next(iter(self.shapes))]
        base = first._base
        if base is None or base.dim() != 1 or base.numel() != self.numel \
                or base.dtype != first.dtype or base.storage_offset() != 0:
            return None
        for key, offset in self.offsets.items():
            value = state[key]
            if value._base is not base or value.storage_offset() != offset \
                    or not value.is_contiguous():
                return None
        return base

    def _fits(self, state: AdapterState) -> bool:
        if len(state) != len(self.shapes) or not self.shapes:
            return False
        for key, shape in self.shapes.items():
            value = state.get(key)
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()
                    and tuple(value.shape) == shape):
                return False
        return True


def _flat_sum(sums: dict[str, object], key: str, numel: int) -> torch.Tensor:
    """One running sum of a shard's ``sums`` as a (numel,) float64 tensor, checked."""
    value = sums.get(key)
    if not (isinstance(value, np.ndarray) and value.dtype == np.float64
            and value.shape == (numel,)):
        raise ValueError(f"a shard's {key!r} must be a float64 array of {numel} values")
    return torch.from_numpy(value)


def _count(sums: dict[str, object]) -> int:
    count = sums.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"a shard's count must be an integer >= 0, got {count!r}")
    return count


def _all_finite(flat: torch.Tensor) -> bool:
    """True iff every value is finite: their float64 sum is finite (NaN and ±Inf propagate)."""
    return math.isfinite(float(flat.sum()))


def apply_delta(global_state: AdapterState, delta: AdapterState) -> AdapterState:
    """``θ_g + Δ`` per key, in the global state's dtype (a new dict; inputs untouched)."""
    _check_states([global_state], global_state, "global state")
    _check_states([delta], global_state, "delta")
    return {k: (g.double() + delta[k].double()).to(g.dtype) for k, g in global_state.items()}


def server_step(
    merged: AdapterState, previous: AdapterState | None, *, lr: float = 1.0,
    momentum: float = 0.0,
) -> AdapterState:
    """The server optimiser's step from the merged delta: ``lr · Δ + momentum · previous``.

    Heavy-ball momentum (FedAvgM) written in steps: with ``previous`` = the last step actually
    applied (θ_{t-1} − θ_{t-2}), its state is the version history. ``previous=None`` (first
    round) or ``momentum=0`` gives ``lr · Δ``; ``lr=1, momentum=0`` returns ``merged`` as is.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    use_previous = previous is not None and momentum > 0
    if lr == 1.0 and not use_previous:
        return merged
    if use_previous:
        assert previous is not None
        _check_states([previous], merged, "previous step")
    step = {}
    for key, value in merged.items():
        total = value.double() * lr
        if use_previous:
            assert previous is not None
            total = total + momentum * previous[key].double()
        step[key] = total.to(value.dtype)
    return step


def clip_to_median_norm(deltas: Sequence[AdapterState], factor: float) -> list[AdapterState]:
    """Each delta scaled down to at most ``factor`` times the median L2 norm (all keys) of
    ``deltas``; deltas within the bound are returned as they are.

    A robust pre-merge step against a poisoned update: fewer than half of the devices cannot
    move the median norm, so none of them weighs more than ``factor`` honest medians.
    """
    norms = [l2_norm(delta) for delta in deltas]
    bound = median_norm_bound(norms, factor)
    return [clip_delta(delta, norm, bound) for delta, norm in zip(deltas, norms, strict=True)]


def median_norm_bound(norms: Sequence[float], factor: float) -> float:
    """``factor`` times the median of ``norms``: the bound of ``clip_to_median_norm``. Apart
    so that a merge that streams its updates can take the norms in a first pass and clip each
    delta (``clip_delta``) as it folds it in, with the same bits."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    if len(norms) == 0:
        raise ValueError("need at least one delta")
    return factor * float(torch.tensor(norms, dtype=torch.float64).median())


def clip_delta(delta: AdapterState, norm: float, bound: float) -> AdapterState:
    """``delta`` (whose ``l2_norm`` is ``norm``) scaled down to ``bound``; itself if within."""
    return delta if norm <= bound else {k: v * (bound / norm) for k, v in delta.items()}


def l2_norm(state: AdapterState) -> float:
    """The L2 norm of a state over all its keys."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


def coordinate_median(deltas: Sequence[AdapterState]) -> AdapterState:
    """Coordinate-wise median of the deltas (mean of the two middle values for an even count).

    Robust to a minority of arbitrary (finite) updates; sample counts are deliberately ignored,
    since a malicious client could lie about them.
    """
    if len(deltas) == 0:
        raise ValueError("need at least one delta, got an empty list")
    _check_states(deltas, deltas[0], "delta")
    count = len(deltas)
    merged = {}
    for key, ref in deltas[0].items():
        ordered = torch.stack([d[key].double() for d in deltas]).sort(dim=0).values  # (K, ...)
        middle = (ordered[(count - 1) // 2] + ordered[count // 2]) / 2
        merged[key] = middle.to(ref.dtype)
    return merged


def _combine(lam: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_k lam[k] * tensors[k]`` in float64."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for weight, tensor in zip(lam.tolist(), tensors, strict=True):
        total = total + weight * tensor.double()
    return total


def _mean_over_keys(state: AdapterState) -> float:
    numel = sum(t.numel() for t in state.values())
    return float(sum(float(t.sum()) for t in state.values()) / numel) if numel else 0.0


def _fisher_scale(fisher: torch.Tensor, total: float, normalize: str) -> float:
    """One client's mean, L2 norm or max of its flat (P,) float64 Fisher whose sum is
    ``total``; numpy's reductions on one thread (not BLAS, whose dot product changes in the
    last bits with the number of threads), so every process gets the same bits."""
    if not fisher.numel():
        return 0.0
    values = fisher.numpy()
    if normalize == "mean":
        return total / values.size
    if normalize == "l2":
        return math.sqrt(float(np.einsum("i,i->", values, values)))
    return float(values.max())


def normalized_weights(weights: Sequence[float], count: int) -> torch.Tensor:
    """``weights / Σ weights`` as float64, checked (``count`` of them, finite, >= 0, not all
    0): the λ ``weighted_average`` and ``fisher_weighted_merge`` use."""
    if count == 0:
        raise ValueError("need at least one client update, got an empty list")
    if len(weights) != count:
        raise ValueError(f"got {count} updates but {len(weights)} weights: {list(weights)!r}")
    lam = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()) or float(lam.sum()) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)!r}")
    return lam / lam.sum()


def _check_states(
    states: Sequence[AdapterState], reference: AdapterState, what: str, nonnegative: bool = False
) -> None:
    """Every state has the reference's keys and shapes, floating finite values (>= 0 if asked)."""
    for index, state in enumerate(states):
        if set(state) != set(reference):
            missing = sorted(set(reference) - set(state))
            extra = sorted(set(state) - set(reference))
            raise ValueError(f"{what} {index}: keys mismatch, missing {missing}, extra {extra}")
        for key, ref in reference.items():
            _check_tensor(state[key], tuple(ref.shape), f"{what} {index} {key!r}", nonnegative)


def _check_tensor(value: object, shape: tuple[int, ...], where: str, nonnegative: bool) -> None:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"{where}: expected a floating-point tensor, got {value!r:.80}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{where}: expected shape {shape}, got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where}: contains NaN or Inf")
    if nonnegative and bool((value < 0).any()):
        raise ValueError(f"{where}: Fisher values must be >= 0, got min {float(value.min())!r}")
