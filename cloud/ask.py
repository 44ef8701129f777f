"""Ask the current global model: an image and a question -> its answer (the dashboard's page).

``ModelAnswerer`` runs the device path once in the cloud, with its own NanoEdge (encoder,
connector, embedder and a copy of the adapters) so it never races the evaluator, which loads
versions into the base's edge. The LLM is the frozen in-process backend:

1. image -> frozen encoder + connector -> I-NanoAdapter; question -> embedder -> T-NanoAdapter,
   laid out by the VQA prompt template (the layout devices train on);
2. closed-answer scores: the softmax over the candidates' first tokens at the answer position,
   which is exactly how the evaluator scores a version (``shared.evaluation.predict``);
3. free text: greedy decoding of up to ``max_new_tokens`` tokens, each generated token embedded
   and adapted like any text token (no KV cache: a few tokens on a short prompt).

The adapter state is loaded only when the global version changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from shared.adapters import AdapterConfig, AdapterState
from shared.backend import LLMBackend
from shared.nanoedge import NanoEdge
from shared.prompts import PromptTemplate, TextTokenizer, candidate_first_tokens, collate
from shared.vision import preprocess

if TYPE_CHECKING:
    from cloud.base.build import LoadedBase

Decode = Callable[[list[int]], str]
MAX_QUESTION_CHARS = 300


class VersionLoadError(RuntimeError):
    """The global version does not fit this answerer's adapters (e.g. another rank)."""


@dataclass(frozen=True)
class CandidateScore:
    answer: str
    probability: float  # softmax over the candidates' first-token log-probabilities


@dataclass(frozen=True)
class Answer:
    """What the model said: the generated text and, for a closed task, the ranked candidates."""

    text: str
    version: str
    candidates: list[CandidateScore] = field(default_factory=list)
    elapsed_ms: float = 0.0

    @property
    def best(self) -> str | None:
        return self.candidates[0].answer if self.candidates else None


class ModelAnswerer:
    """Answers questions about images with the frozen base and a global adapter version."""

    def __init__(self, edge: NanoEdge, backend: LLMBackend, tokenizer: TextTokenizer,
                 template: PromptTemplate, *, decode: Decode, stop_ids: Collection[int] = (),
                 candidates: Sequence[str] = (), max_new_tokens: int = 8,
                 image_size: int = 224) -> None:
        if edge.encoder is None:
            raise ValueError("the answerer's NanoEdge needs its encoder (images arrive raw)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        self.edge = edge.eval()
        self.backend = backend
        self.tokenizer = tokenizer
        self.template = template
        self.decode = decode
        self.stop_ids = frozenset(stop_ids)
        self.candidates = list(candidates)
        self.firsts = (candidate_first_tokens(tokenizer, template, self.candidates)
                       if self.candidates else None)
        self.max_new_tokens = max_new_tokens
        self.image_size = image_size
        self._loaded: str | None = None
        self._lock = threading.Lock()  # one request at a time: the adapters are shared state

    def answer(self, image: Image.Image, question: str, *, version: str,
               load_state: Callable[[], AdapterState]) -> Answer:
        """The answer of global version ``version`` (``load_state`` is called only when it is
        not the version already loaded)."""
        question = question.strip()
        if not question or len(question) > MAX_QUESTION_CHARS:
            raise ValueError(f"the question must be 1-{MAX_QUESTION_CHARS} characters, "
                             f"got {len(question)}")
        started = time.perf_counter()
        with self._lock, torch.no_grad():
            if self._loaded != version:
                self._load(version, load_state())
            embeds, mask = self._prompt(image, question)  # (1, L, d), (1, L)
            logprobs = self.backend.score(embeds, mask)[0]  # (vocab,)
            ranked = self._rank(logprobs)
            text = self._generate(embeds, mask, logprobs)
        return Answer(text=text, version=version, candidates=ranked,
                      elapsed_ms=(time.perf_counter() - started) * 1000)

    def _load(self, version: str, state: AdapterState) -> None:
        try:
            self.edge.adapters.load_adapter_state_dict(state)
        except ValueError as err:
            self._loaded = None
            raise VersionLoadError(f"global version {version} does not fit the answerer's "
                                   f"adapters: {err}") from err
        self._loaded = version

    def _prompt(self, image: Image.Image, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = preprocess([image], self.image_size)  # (1, 3, S, S)
        visual = self.edge.visual_tokens(pixels)  # (1, V, d)
        batch = collate(self.tokenizer, self.template, [question], None, visual.shape[1])
        return self.edge(visual, batch), batch.attention_mask

    def _rank(self, logprobs: torch.Tensor) -> list[CandidateScore]:
        if self.firsts is None:
            return []
        probs = torch.softmax(logprobs[self.firsts], dim=0)  # (n_candidates,)
        order = torch.argsort(probs, descending=True).tolist()
        return [CandidateScore(self.candidates[i], float(probs[i])) for i in order]

    def _generate(self, embeds: torch.Tensor, mask: torch.Tensor,
                  logprobs: torch.Tensor) -> str:
        ids: list[int] = []
        for _ in range(self.max_new_tokens):
            next_id = int(logprobs.argmax())
            if next_id in self.stop_ids:
                break
            ids.append(next_id)
            token = torch.tensor([[next_id]], dtype=torch.long)
            adapted = self.edge.adapters.text(self.edge.embedder(token))  # (1, 1, d)
            embeds = torch.cat([embeds, adapted.to(embeds.dtype)], dim=1)  # (1, L+1, d)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logprobs = self.backend.score(embeds, mask)[0]
        return self.decode(ids).strip()


def answerer_for_base(base: LoadedBase, adapter_config: AdapterConfig, *,
                      candidates: Sequence[str] | None = None) -> ModelAnswerer:
    """An answerer over a loaded base (its own NanoEdge); candidates default to easy-VQA's."""
    if candidates is None:
        from shared.data.easyvqa import ANSWERS

        candidates = ANSWERS
    hf_tokenizer = base.pretrained.tokenizer
    eos = getattr(hf_tokenizer, "eos_token_id", None)
    newline = base.tokenizer.encode_plain("\n")

    def decode(ids: list[int]) -> str:
        return str(hf_tokenizer.decode(ids, skip_special_tokens=True))

    return ModelAnswerer(base.make_edge(adapter_config), base.backend, base.tokenizer,
                         base.template, decode=decode,
                         stop_ids={*([eos] if eos is not None else []), *newline[:1]},
                         candidates=candidates)
