"""FedDPA-F (Yang et al., NeurIPS 2024): dual personalising adapters, the sequential variant.

The paper FedNano compares against. A *global* adapter pair is trained federatedly (FedAvg);
then each device trains a *local* adapter pair on its own data with the global pair frozen
("-F": sequential, after federated training). At inference both act in parallel on the same
input, the local one weighted per instance by how close the instance is to the device's
training data (instance-wise dynamic weighting)::

    h' = h + Δ_global(h) + w(x) · Δ_local(h),   Δ(h) = (α/r) · B A h

with ``w(x)`` the mean cosine similarity of x's representation (the mean of its unadapted input
embeddings) to its ``top_k`` nearest local training instances, clipped to [0, 1]. Training uses
``w = 1``. Evaluated on each device's own held-out data (personalisation) and on the shared test
split (test-time distribution shift).
"""

from __future__ import annotations

import torch

from shared.adapters import AdapterConfig, AdapterState, NanoAdapters
from shared.nanoedge import NanoEdge
from shared.prompts import EncodedBatch


class DualNanoEdge(NanoEdge):
    """A NanoEdge whose trainable ``adapters`` are the local pair, on top of a frozen global
    pair; ``reference`` (N, d) turns on instance-wise weighting of the local pair."""

    def __init__(self, template: NanoEdge, config: AdapterConfig, global_state: AdapterState,
                 top_k: int = 5) -> None:
        super().__init__(template.connector, template.embedder, config, encoder=template.encoder)
        self.global_adapters = NanoAdapters(template.width, config)
        self.global_adapters.load_adapter_state_dict(global_state)
        self.global_adapters.requires_grad_(False)
        self.reference: torch.Tensor | None = None  # (N, d) unit rows, set for inference
        self.top_k = top_k

    def forward(self, visual: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
        text = self.embedder(batch.input_ids)  # (B, L, d)
        image = visual.to(text.dtype)  # (B, V, d)
        weight = self.instance_weights(text, image, batch)  # (B,)
        text = _dual(self.global_adapters.text, self.adapters.text, text, weight[:, None, None])
        image = _dual(self.global_adapters.image, self.adapters.image, image,
                      weight[:, None, None])
        return text.masked_scatter(batch.image_mask.unsqueeze(-1), image)

    @torch.no_grad()
    def representation(self, visual: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
        """(B, d) unit vectors: the mean of each row's unadapted real input embeddings."""
        text = self.embedder(batch.input_ids)
        return _represent(text, visual.to(text.dtype), batch)

    def instance_weights(self, text: torch.Tensor, image: torch.Tensor,
                         batch: EncodedBatch) -> torch.Tensor:
        if self.reference is None:  # training: the local pair at full weight
            return torch.ones(batch.size, dtype=text.dtype)
        with torch.no_grad():
            sims = _represent(text, image, batch) @ self.reference.T  # (B, N)
            k = min(self.top_k, sims.shape[1])
            return sims.topk(k, dim=1).values.mean(dim=1).clamp(0.0, 1.0)  # (B,)


def _dual(global_adapter: torch.nn.Module, local_adapter: torch.nn.Module, h: torch.Tensor,
          weight: torch.Tensor) -> torch.Tensor:
    return global_adapter(h) + weight * (local_adapter(h) - h)


def _represent(text: torch.Tensor, image: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    tokens = text.masked_scatter(batch.image_mask.unsqueeze(-1), image)  # (B, L, d)
    mask = batch.attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
    mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1)  # (B, d)
    return torch.nn.functional.normalize(mean, dim=-1)
