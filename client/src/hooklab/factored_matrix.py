"""``FactoredMatrix``: a matrix kept as the product ``A @ B`` of two thin factors.

Same API and results as TransformerLens 3.9's ``FactoredMatrix``: leading (batch) axes broadcast,
``@`` keeps the product factored, and SVD, eigenvalues and the Frobenius norm are computed from
the factors without materialising ``A @ B``. ``model.QK`` / ``model.OV`` are built from it.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import Any, overload

import torch

from .utils import get_corner, transpose


class FactoredMatrix:
    """``A [..., ldim, mdim] @ B [..., mdim, rdim]``, with broadcast leading axes.

    ``A`` and ``B`` are torch tensors; anything tensor-like that supports ``@``, ``broadcast_to``
    and ``size`` works for the products (``@``, ``AB``, ``BA``).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if A.size(-1) != B.size(-2):
            raise AssertionError(
                "Factored matrix must match on inner dimension, "
                f"shapes were a: {A.shape}, b:{B.shape}"
            )
        self.ldim: int = A.size(-2)
        self.mdim: int = B.size(-2)
        self.rdim: int = B.size(-1)
        self.has_leading_dims: bool = A.ndim > 2 or B.ndim > 2
        try:
            # torch.broadcast_shapes has no annotations (it returns a torch.Size).
            leading = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])  # type: ignore[no-untyped-call]
        except RuntimeError as e:
            raise RuntimeError(
                "Shape mismatch: Cannot broadcast leading dimensions. "
                f"A has shape {A.shape}, B has shape {B.shape}. {e}"
            ) from e
        self.shape: torch.Size = torch.Size((*leading, self.ldim, self.rdim))
        self.A: torch.Tensor = A.broadcast_to((*leading, self.ldim, self.mdim))
        self.B: torch.Tensor = B.broadcast_to((*leading, self.mdim, self.rdim))

    # ---- products ----------------------------------------------------------------------------

    @overload
    def __matmul__(self, other: FactoredMatrix) -> FactoredMatrix: ...
    @overload
    def __matmul__(self, other: torch.Tensor) -> FactoredMatrix | torch.Tensor: ...

    def __matmul__(self, other: Any) -> Any:
        """``self @ other``: a FactoredMatrix, or a tensor ``[..., ldim]`` for a vector."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim < 2:  # vector: collapse the product
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.size(-2) != self.rdim:
            raise AssertionError(
                "Right matrix must match on inner dimension, "
                f"shapes were self: {self.shape}, other:{other.shape}"
            )
        # Keep whichever inner dimension is the smaller one.
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    @overload
    def __rmatmul__(self, other: FactoredMatrix) -> FactoredMatrix: ...
    @overload
    def __rmatmul__(self, other: torch.Tensor) -> FactoredMatrix | torch.Tensor: ...

    def __rmatmul__(self, other: Any) -> Any:
        """``other @ self``: a FactoredMatrix, or a tensor ``[..., rdim]`` for a vector."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if other.size(-1) != self.ldim:
            raise AssertionError(
                "Left matrix must match on inner dimension, "
                f"shapes were self: {self.shape}, other:{other.shape}"
            )
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | torch.Tensor) -> FactoredMatrix:
        """Scale by a number (or one-element tensor); the factor ``A`` carries it."""
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise AssertionError(
                f"Tensor must be a scalar for use with * but was of shape {scalar.shape}. "
                "For matrix multiplication, use @ instead."
            )
        return FactoredMatrix(self.A * scalar, self.B)

    def __rmul__(self, scalar: float | torch.Tensor) -> FactoredMatrix:
        return self * scalar

    @property
    def AB(self) -> torch.Tensor:
        """The full product ``[..., ldim, rdim]`` (may be large)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reversed product ``[..., mdim, mdim]``; needs a square matrix (ldim == rdim)."""
        if self.rdim != self.ldim:
            raise AssertionError(f"Can only take ba if ldim==rdim, shapes were self: {self.shape}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(transpose(self.B), transpose(self.A))

    # ---- spectrum ----------------------------------------------------------------------------

    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A = Ua Sa Vaᵀ, B = Ub Sb Vbᵀ  =>  AB = Ua (Sa Vaᵀ Ub Sb) Vbᵀ; the small middle matrix
        # [k_a, k_b] is decomposed once more and its singular vectors rotated back out.
        u_a, s_a, vh_a = torch.linalg.svd(self.A, full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(self.B, full_matrices=False)
        middle = s_a[..., :, None] * vh_a @ u_b * s_b[..., None, :]
        u_m, s_m, vh_m = torch.linalg.svd(middle, full_matrices=False)
        return u_a @ u_m, s_m, transpose(vh_b) @ transpose(vh_m)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U [..., ldim, k], S [..., k], V [..., rdim, k])`` with ``U diag(S) Vᵀ == AB``."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self.svd()[0]

    @property
    def S(self) -> torch.Tensor:
        return self.svd()[1]

    @property
    def V(self) -> torch.Tensor:
        """Right singular vectors (columns): ``AB == U diag(S) Vᵀ``."""
        return self.svd()[2]

    @property
    def Vh(self) -> torch.Tensor:
        """Deprecated alias of :attr:`V` (it has always been V, not Vᴴ)."""
        warnings.warn(
            "FactoredMatrix.Vh has always returned V (right singular vectors), not Vh. "
            "Use .V for the canonical name; for the actual Hermitian transpose use "
            ".V.transpose(-2, -1). The .Vh alias will be removed in a future release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.svd()[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``BA`` (complex, ``[..., mdim]``): the non-zero ones of ``AB``."""
        square = self.BA
        if square.dtype in (torch.float16, torch.bfloat16):
            square = square.to(torch.float32)  # eig has no 16-bit kernels
        eigenvalues: torch.Tensor = torch.linalg.eig(square).eigenvalues
        return eigenvalues

    def norm(self) -> torch.Tensor:
        """Frobenius norm ``[...]``, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    # ---- indexing and reshaping --------------------------------------------------------------

    @staticmethod
    def _keep_axis(index: tuple[Any, ...], position: int) -> tuple[Any, ...]:
        """An int at ``index[position]`` becomes a one-element slice, so the axis stays."""
        value = index[position]
        if not isinstance(value, int):
            return index
        stop = None if value == -1 else value + 1
        items = list(index)
        items[position] = slice(value, stop)
        return tuple(items)

    def __getitem__(self, idx: Any) -> FactoredMatrix:
        """Index the leading axes; one or two extra indices pick rows of A / columns of B."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        n_indexed = sum(1 for i in idx if i is not None)
        n_axes = len(self.shape)
        if n_indexed <= n_axes - 2:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if n_indexed == n_axes - 1:
            idx = self._keep_axis(idx, -1)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if n_indexed == n_axes:
            idx = self._keep_axis(self._keep_axis(idx, -1), -2)
            return FactoredMatrix(self.A[idx[:-1]], self.B[(*idx[:-2], slice(None), idx[-1])])
        raise ValueError(f"{idx} is too long an index for a FactoredMatrix with shape {self.shape}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def unsqueeze(self, k: int) -> FactoredMatrix:
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.A, self.B)

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U √S) (√S Vᵀ)``: balanced factors with orthogonal rows/cols."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * transpose(self.V))

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) Vᵀ`` ``[..., k, rdim]``: the matrix without its left orthogonal factor."""
        return self.S[..., :, None] * transpose(self.V)

    def collapse_r(self) -> torch.Tensor:
        """``U diag(S)`` ``[..., ldim, k]``: the matrix without its right orthogonal factor."""
        return self.U * self.S[..., None, :]

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left ``k`` by ``k`` block of the product (leading axes cut to ``k`` too)."""
        return get_corner(self.A[..., :k, :] @ self.B[..., :, :k], k)

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"


__all__ = ["FactoredMatrix"]
