"""The frozen LLM behind the ``LLMBackend`` interface, in this process.

The decoder runs on ``inputs_embeds``; the LM head runs only where it is needed (answer positions
for the loss, the last real token for scoring), which skips most of the 49k-wide vocabulary
projection. Gradients flow to the inputs only: every LLM parameter is frozen.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.backend import StepResult, check_step_inputs
from shared.prompts import IGNORE_INDEX


class InProcessLLM:
    """``LLMBackend`` over a decoder (``inputs_embeds`` -> hidden states) and an LM head."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, width: int, max_tokens: int = 512):
        self.decoder = decoder.requires_grad_(False).eval()
        self.lm_head = lm_head.requires_grad_(False).eval()
        self.width = width
        self.max_tokens = max_tokens
        weight = getattr(lm_head, "weight", None)
        self.vocab_size = int(weight.shape[0]) if weight is not None else None
        self.device = torch.device("cpu")

    @classmethod
    def from_causal_lm(cls, model: nn.Module, max_tokens: int = 512) -> InProcessLLM:
        """Split a Hugging Face ``*ForCausalLM`` into its decoder and LM head."""
        decoder = model.get_decoder()  # type: ignore[operator]
        head = model.get_output_embeddings()  # type: ignore[operator]
        config: Any = model.config
        width = int(config.hidden_size)
        return cls(decoder, head, width, max_tokens)

    def to(self, device: str | torch.device) -> InProcessLLM:
        """Run the LLM on ``device`` (e.g. ``cuda``); callers keep their tensors where they are.

        Inputs are moved to the LLM's device and results back to the inputs' device, so a
        device-side trainer on the CPU can use an LLM on a GPU, as in production.
        """
        self.decoder.to(device)
        self.lm_head.to(device)
        self.device = torch.device(device)
        return self

    def _hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.decoder(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
        )
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, L, d)

    def loss_and_input_grads(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> StepResult:
        check_step_inputs(
            inputs_embeds, attention_mask, labels, self.width, self.max_tokens, self.vocab_size
        )
        home = inputs_embeds.device
        inputs_embeds, attention_mask, labels = (
            t.to(self.device) for t in (inputs_embeds, attention_mask, labels))
        targets = labels[:, 1:]  # position t predicts token t+1
        counts = (targets != IGNORE_INDEX).sum(dim=1)  # (B,)
        if not bool((counts > 0).all()):
            raise ValueError("every row needs at least one answer token in labels")
        embeds = inputs_embeds.detach().requires_grad_(True)
        with torch.enable_grad():
            hidden = self._hidden(embeds, attention_mask)[:, :-1]  # (B, L-1, d)
            rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
            logits = self.lm_head(hidden[rows, cols])  # (N, vocab), N answer tokens in the batch
            token_loss = F.cross_entropy(logits.float(), targets[rows, cols], reduction="none")
            totals = torch.zeros(labels.shape[0], device=token_loss.device, dtype=token_loss.dtype)
            sample_losses = totals.index_add(0, rows, token_loss) / counts
            loss = sample_losses.mean()
            (grads,) = torch.autograd.grad(loss, embeds)
        return StepResult(float(loss.detach()), sample_losses.detach().to(home), grads.to(home))

    @torch.no_grad()
    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        check_step_inputs(inputs_embeds, attention_mask, None, self.width, self.max_tokens)
        home = inputs_embeds.device
        inputs_embeds, attention_mask = (inputs_embeds.to(self.device),
                                         attention_mask.to(self.device))
        hidden = self._hidden(inputs_embeds, attention_mask)  # (B, L, d)
        last = attention_mask.sum(dim=1) - 1  # right padding: last real token per row
        logits = self.lm_head(hidden[torch.arange(hidden.shape[0]), last])  # (B, vocab)
        return torch.log_softmax(logits.float(), dim=-1).to(home)
