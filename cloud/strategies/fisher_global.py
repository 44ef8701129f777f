"""Fisher merge with the Fisher measured at the global point, with model-sampled labels.

Every device estimates its Fisher at the global model it received (before training), with each
label drawn from the model's own predictive distribution (the "true" Fisher; Kunstner et al.
2019) instead of the data's answers. All devices then measure at the same point, so their Fisher
magnitudes are comparable and the merge weights say which elements each device's data constrains.
"""

from __future__ import annotations

from typing import ClassVar

from cloud.strategies.fisher_norm import FisherNorm


class FisherGlobal(FisherNorm):
    """``fisher-norm``'s merge of a Fisher taken at θ_global with sampled labels."""

    name: ClassVar[str] = "fisher-global"

    def client_hparams(self) -> dict[str, object]:
        return {**super().client_hparams(), "fisher_point": "global", "fisher_labels": "sampled"}
