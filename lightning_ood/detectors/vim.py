"""ViM: a virtual logit from the feature residual outside the principal subspace."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_ood import distributed
from lightning_ood.detectors import gaussian
from lightning_ood.detectors.base import Detector, FitData, ForwardOutputs
from lightning_ood.detectors.functional import check_finite, stable_row_norm
from lightning_ood.detectors.registry import register

#: Principal dimensions D_p tried by the tuning; values >= D are dropped for the attached
#: head (CIFAR ResNet-18, D = 512: 64, 128, 256; ResNet-50, D = 2048: all six).
PRINCIPAL_DIM_GRID: tuple[int, ...] = (64, 128, 256, 512, 1000, 1536)


def default_principal_dim(dim: int) -> int:
    """The authors' rule (``benchmark.py``): D_p = 1000 if D >= 2048, 512 if D >= 768,
    else D // 2."""
    if dim >= 2048:
        return 1000
    if dim >= 768:
        return 512
    return dim // 2


def vim_origin(weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The origin ``u = -pinv(W) b`` (float64, (D,)), the point whose logits are 0 when
    ``b`` is in the column space of W (zeros without a bias)."""
    w = weight.detach().to(torch.float64)
    if bias is None:
        return torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
    return -(torch.linalg.pinv(w) @ bias.detach().to(torch.float64))


@register("vim")
class VirtualLogitMatching(Detector):
    """ViM (Virtual-logit Matching).

    Wang, Li, Feng, Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching",
    CVPR 2022. With the linear head ``W, b`` and the origin ``u = -pinv(W) b``: the
    principal subspace is spanned by the eigenvectors of the largest ``D_p`` eigenvalues of
    ``(1/N) sum (f - u)(f - u)^T`` over ID training features (second moment about u, not
    the covariance); ``R`` (D, D - D_p) spans the rest. The virtual logit is
    ``alpha * ||(f - u)^T R||`` with ``alpha = mean_train max_c logit_c / mean_train
    ||(f - u)^T R||``, and the score is ``logsumexp(logits) - alpha * ||(f - u)^T R||``
    (higher = ID; the authors' ``-vlogit + energy``).

    Fitting makes two streamed passes over the training features: ``sum (f-u)(f-u)^T``
    and N in float64 (reduced across ranks, then ``eigh``), then the sums of max logits and
    residual norms (reduced across ranks; alpha = their ratio = the ratio of means). The max
    logits are those of ``FitData.logits`` when given, else ``W f + b``.

    Buffers: ``origin`` (D,) float32; ``basis`` (D, D) float32, every eigenvector sorted
    by decreasing eigenvalue (the residual basis is its last D - D_p columns; keeping all
    columns lets a strict ``load_state_dict`` work whatever D_p was tuned to: 16.8 MB for
    D = 2048, vs 8.6 MB for the residual part alone); ``eigenvalues`` (D,) float64;
    ``alpha`` float64; ``n_train``; ``principal_dim_buffer`` (D_p, so checkpoints carry a
    tuned value). Residual norms are computed from a float32 product and a float64 norm, the
    score in float64 and returned as float32 (clamped to its finite range).

    Deviations from the authors' code (deliberate):

    * ``eigh`` of the symmetric matrix in float64 instead of ``np.linalg.eig`` (equal
      subspace; eig can return complex round-off);
    * alpha = 0 (the score reduces to energy) when every training residual is zero
      (D_p >= rank of the centred data), where the authors divide by zero;
    * the max logits for alpha come from ``FitData.logits`` when given (equal to
      ``W f + b`` for a linear head in evaluation).

    Args:
        principal_dim: D_p; ``None`` for the authors' rule from D at :meth:`attach`
            (:func:`default_principal_dim`). Must satisfy 0 <= D_p < D.
        chunk_rows: training rows read at once during :meth:`fit`.
    """

    name = "vim"
    reads = ("logits", "features", "head")
    requires_fit = True
    tuning_grid = {"principal_dim": PRINCIPAL_DIM_GRID}
    reported_attributes = ("principal_dim", "feature_dim")
    reported_buffers = ("alpha", "n_train")

    def __init__(self, principal_dim: Optional[int] = None, chunk_rows: int = 4096) -> None:
        super().__init__()
        if int(chunk_rows) != chunk_rows or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)
        self.feature_dim = 0
        self.num_classes = 0
        self._head: tuple[nn.Module, ...] = ()
        self._principal_dim: Optional[int] = None
        self._alpha_dim: Optional[int] = None  # the D_p that alpha was fitted for
        self.register_buffer("principal_dim_buffer", torch.tensor(-1, dtype=torch.int64))
        if principal_dim is not None:
            self._check_dim(principal_dim)
            self.principal_dim = principal_dim
        for buffer in ("origin", "basis", "eigenvalues", "alpha", "n_train"):
            self.register_buffer(buffer, None)

    # ------------------------------------------------------------------ D_p
    @property
    def principal_dim(self) -> Optional[int]:
        """D_p, stored in the ``principal_dim_buffer`` buffer (``None`` until resolved)."""
        return self._principal_dim

    @principal_dim.setter
    def principal_dim(self, value: int) -> None:
        self._check_dim(value)
        self.principal_dim_buffer.fill_(int(value))
        self._principal_dim = int(value)

    def _check_dim(self, value: Any) -> None:
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"ViM principal_dim must be an integer >= 0, got {value!r}")
        if self.feature_dim and value >= self.feature_dim:
            raise ValueError(f"ViM principal_dim must be < D = {self.feature_dim} (the residual "
                             f"subspace would be empty), got {value}")

    def sync_from_buffers(self) -> None:
        value = int(self.principal_dim_buffer)
        if value >= 0:
            self._check_dim(value)
        self._principal_dim = value if value >= 0 else None
        self._alpha_dim = self._principal_dim if bool(self.fitted) else None

    def set_hyperparameters(self, **values: Any) -> bool:
        """Set D_p; returns ``True`` when it changed (alpha, and so the fit, is stale)."""
        self.check_grid({key: [value] for key, value in values.items()})
        if "principal_dim" not in values or int(values["principal_dim"]) == self.principal_dim:
            return False
        self.principal_dim = int(values["principal_dim"])
        if self._alpha_dim is not None:  # scoring is valid again once back at the fitted D_p
            self.fitted.fill_(self.principal_dim == self._alpha_dim)
        return True

    def tuning_candidates(self, overrides: Optional[dict[str, Sequence[Any]]] = None) -> list[dict[str, Any]]:
        """The grid with the values that do not fit the attached D (>= D) left out; values
        given in ``overrides`` are kept (and refused by :meth:`set_hyperparameters` if
        invalid)."""
        overrides = dict(overrides or {})
        if "principal_dim" not in overrides and self.feature_dim:
            overrides["principal_dim"] = [v for v in PRINCIPAL_DIM_GRID if v < self.feature_dim]
        return super().tuning_candidates(overrides)

    # ------------------------------------------------------------------ set-up
    def skip_reason(self, head: nn.Module, num_blocks: int = 0) -> Optional[str]:
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            return (f"ViM needs a linear head's weight W (C, D) and bias b; {type(head).__name__} "
                    "has no 2-D weight (e.g. a prototype/distance head)")
        bias = getattr(head, "bias", None)
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
            return f"ViM needs a bias of shape ({weight.shape[0]},); {type(head).__name__} has another"
        return None

    def attach(self, head: nn.Module, num_blocks: int = 0) -> None:
        """Keep an unregistered reference to the head, compute ``u = -pinv(W) b`` and
        allocate the buffers (kept with their fit when they already have the right shapes,
        e.g. after loading a checkpoint)."""
        reason = self.skip_reason(head, num_blocks)
        if reason is not None:
            raise ValueError(reason)
        self._head = (head,)
        weight = head.weight
        classes, dim = (int(s) for s in weight.shape)
        self.num_classes, self.feature_dim = classes, dim
        if self.principal_dim is None:
            self.principal_dim = default_principal_dim(dim)
        self._check_dim(self.principal_dim)
        shapes = {"origin": ((dim,), torch.float32), "basis": ((dim, dim), torch.float32),
                  "eigenvalues": ((dim,), torch.float64), "alpha": ((), torch.float64),
                  "n_train": ((), torch.int64)}
        matches = all(getattr(self, k) is not None and tuple(getattr(self, k).shape) == s
                      for k, (s, _) in shapes.items())
        if matches:
            for key, (_, dtype) in shapes.items():
                setattr(self, key, getattr(self, key).to(dtype))
            if not bool(self.fitted):
                self.origin.copy_(vim_origin(weight, getattr(head, "bias", None)))
            return
        for key, (shape, dtype) in shapes.items():
            setattr(self, key, torch.zeros(shape, dtype=dtype, device=weight.device))
        self.origin.copy_(vim_origin(weight, getattr(head, "bias", None)))
        self.fitted.fill_(False)

    def _require_attached(self) -> None:
        if self.basis is None:
            raise RuntimeError("ViM has no buffers: call attach(head) first")

    # ------------------------------------------------------------------ fit / score
    def residual_norms(self, features: Tensor) -> Tensor:
        """(B,) float64 ``||(f - u)^T R||`` for the current D_p (no input checks); the norm of
        the float32 projection without over/underflow (:func:`stable_row_norm`; a float64
        ``vector_norm`` is ~15x slower on the CPU, measured)."""
        residual = self.basis[:, self.principal_dim:]
        projected = (features.to(torch.float32) - self.origin) @ residual
        return stable_row_norm(projected).to(torch.float64)

    def _fit_logits(self, chunk: FitData) -> Tensor:
        if chunk.logits is not None:
            if chunk.logits.shape != (chunk.features.shape[0], self.num_classes):
                raise ValueError(f"FitData.logits must have shape (N, {self.num_classes}); "
                                 f"got {tuple(chunk.logits.shape)}")
            check_finite(chunk.logits, "ViM fit logits")
            return chunk.logits.to(torch.float64)
        head = self._head[0]
        weight = head.weight.detach().to(torch.float64)
        logits = chunk.features.to(torch.float64) @ weight.t()
        bias = getattr(head, "bias", None)
        return logits if bias is None else logits + bias.detach().to(torch.float64)

    @torch.no_grad()
    def fit(self, data: FitData) -> None:
        """Principal subspace from ``sum (f-u)(f-u)^T``, then alpha (two streamed passes;
        every rank calls it, sums are reduced across ranks)."""
        self._require_attached()
        if not self._head:
            raise RuntimeError("ViM.fit needs the head (for W f + b): call attach(head) first")
        device = self.basis.device
        origin = self.origin.to(torch.float64)
        moment = torch.zeros(self.feature_dim, self.feature_dim, dtype=torch.float64, device=device)
        for chunk in data.chunks(self.chunk_rows):
            gaussian.check_features(chunk.features, self.feature_dim, "ViM fit features")
            centred = chunk.features.detach().to(device, torch.float64) - origin
            moment.addmm_(centred.t(), centred)
        moment = distributed.all_reduce(moment, "sum")
        count = int(distributed.all_reduce(torch.tensor(len(data), dtype=torch.int64, device=device), "sum"))
        if count == 0:
            raise ValueError("ViM.fit received no training features on any rank")
        moment = moment / count
        values, vectors = torch.linalg.eigh((moment + moment.t()) / 2)
        order = torch.argsort(values, descending=True)
        self.eigenvalues.copy_(values[order])
        self.basis.copy_(vectors[:, order])

        totals = torch.zeros(2, dtype=torch.float64, device=device)  # max logits, residual norms
        for chunk in data.chunks(self.chunk_rows):
            features = chunk.features.detach().to(device)
            totals[0] += self._fit_logits(chunk).to(device).amax(dim=1).sum()
            totals[1] += self.residual_norms(features).sum()
        max_logit_sum, residual_sum = distributed.all_reduce(totals, "sum").tolist()
        self.alpha.fill_(max_logit_sum / residual_sum if residual_sum > 0 else 0.0)
        self.n_train.fill_(count)
        super().fit(data)
        self.sync_from_buffers()

    def score(self, outputs: ForwardOutputs) -> Tensor:
        self._require_attached()
        features, logits = outputs.features, outputs.logits
        gaussian.check_features(features, self.feature_dim, "ViM features")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or logits.shape[0] != features.shape[0]:
            raise ValueError(f"ViM logits must have shape (B, {self.num_classes}) with the features' B; "
                             f"got {tuple(logits.shape)} for features {tuple(features.shape)}")
        check_finite(logits, "ViM logits")
        # float32 logits are already rounded to float32: their logsumexp in float32 (1 ulp), then
        # the score in float64 (no (B, C) float64 copy)
        energy = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
        energy = energy.to(torch.float64)
        return gaussian.to_float32_score(energy - self.alpha * self.residual_norms(features))

    def extra_repr(self) -> str:
        return f"principal_dim={self.principal_dim}, feature_dim={self.feature_dim}"
