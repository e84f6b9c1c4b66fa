"""Spectra of the loop: ρ, ‖·‖₂ and eigenvalues of Ā, and of the loop map's Jacobian.

The linearised loop h ← Ā h + B̄ e is stable iff the spectral radius

    ρ(Ā) = max |λᵢ(Ā)|  <  1.

For a diagonal Ā (a vector a) the eigenvalues are the entries, so ρ = ‖Ā‖₂ = max|aᵢ|.
For a dense Ā, ρ ≤ ‖Ā‖₂ = σ_max(Ā), with equality when Ā is normal; ρ decides whether
Āᵗ → 0, ‖Ā‖₂ < 1 whether every single step contracts.

The nonlinear loop F near a state h: F(h + δ) ≈ F(h) + J δ with J = ∂F/∂h. The leading
eigenvalues of J are found from Jacobian-vector products J v alone (torch.func.jvp),
without forming J: a restarted block Arnoldi method on the state's device (batched
JVPs), ARPACK's implicitly restarted Arnoldi on the host, or block power iteration.
`method="dense"` forms J with n JVPs and is the reference.

Every function here takes any torch map f: h → h, not only a model's loop map (see
maps.py); `loop_jacobian` is the entry point for any loop model (model/interface.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor
from torch.func import jvp

from stabilitylab.analysis.maps import (Map, at_position, batched_jvp, checked_map, loop_state, math_attention,
                                       orthonormal_rows, work_dtype)
from stabilitylab.model.interface import LoopModel

FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32,
                "float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = ("auto", "dense", "krylov", "arnoldi", "power")
KRYLOV_BLOCK = 8  # JVPs per vmapped call in method="krylov"
AUTO_DENSE_MAX = 512  # method="auto" forms J densely up to this many state entries


# ---- Ā: a diagonal vector or a dense matrix, from numpy, torch or cupy ------------------------

def _float_dtype(dtype: Any) -> torch.dtype:
    """A torch floating dtype from a torch dtype, a numpy dtype or a name like "bfloat16"."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a floating dtype; use one of {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def _to_torch(A: Any) -> tuple[Tensor, str]:
    """(A as a torch tensor, sharing memory where possible; the library it came from).
    cupy is never imported here: a cupy array exists only once its user imported cupy."""
    if isinstance(A, Tensor):
        return A.detach(), "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(A, cupy.ndarray):
        return torch.from_dlpack(A), "cupy"
    if isinstance(A, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(A)), "numpy"
    raise TypeError(f"expected a numpy, torch or cupy array, got {type(A).__name__}")


def _from_torch(t: Tensor, library: str) -> Any:
    if library == "numpy":
        return t.cpu().numpy()
    if library == "cupy":
        return sys.modules["cupy"].from_dlpack(t)
    return t


def _transition(A: Any, dtype: Any) -> tuple[Tensor, str]:
    """Ā as float64 (complex128) after rounding it to `dtype`, checked: (d,) or (d, d), finite."""
    t, library = _to_torch(A)
    if t.ndim not in (1, 2) or t.numel() == 0 or (t.ndim == 2 and t.shape[0] != t.shape[1]):
        raise ValueError(f"Ā must be a non-empty (d,) diagonal or a square (d, d) matrix, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        raise TypeError("Ā must be numeric, got a boolean array")
    if dtype is not None:
        if t.is_complex():
            raise ValueError("dtype= rounds a real Ā to a float dtype; this Ā is complex")
        t = t.to(_float_dtype(dtype))  # the rounding the model's arithmetic would apply
    t = t.to(torch.complex128 if t.is_complex() else torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"Ā has {int((~torch.isfinite(t)).sum())} non-finite entries; its spectrum is undefined")
    return t, library


def eigenvalues(A: Any, dtype: Any = None) -> Any:
    """Eigenvalues of Ā, complex128, sorted by modulus, descending, in A's library and device.

    A: a (d,) diagonal (its entries are the eigenvalues) or a (d, d) matrix; numpy, torch or
    cupy. dtype: round A to this dtype first ("float32", torch.bfloat16, ...), to see the
    matrix the model's arithmetic actually holds; the eigenvalues are then computed in float64.
    """
    t, library = _transition(A, dtype)
    lam = t.to(torch.complex128) if t.ndim == 1 else _eigvals(t)
    return _from_torch(_by_modulus(lam), library)


def spectral_radius(A: Any, dtype: Any = None) -> float:
    """ρ(Ā) = max|λᵢ| (= max|aᵢ| for a diagonal). With dtype= Ā is first rounded to that
    dtype, so an entry exp(−Δa) that rounds to 1.0 in the model's dtype reports ρ = 1.0."""
    t, _ = _transition(A, dtype)
    lam = t if t.ndim == 1 else _eigvals(t)
    return float(lam.abs().max())


def spectral_norm(A: Any, dtype: Any = None) -> float:
    """‖Ā‖₂ = σ_max(Ā) (= max|aᵢ| for a diagonal), after rounding to dtype as in spectral_radius."""
    t, _ = _transition(A, dtype)
    return float(t.abs().max() if t.ndim == 1 else torch.linalg.matrix_norm(t, ord=2))


def _eigvals(M: Tensor) -> Tensor:
    """Eigenvalues of a square float64 (complex128) matrix, on M's device. torch's LAPACK
    (MKL) gives up on some badly scaled matrices (entries ~1e-245 beside 1) that numpy's
    LAPACK solves; those are retried with numpy on the host."""
    try:
        return torch.linalg.eigvals(M)
    except torch.linalg.LinAlgError:
        return torch.from_numpy(np.linalg.eigvals(M.cpu().numpy())).to(M.device)


def _by_modulus(lam: Tensor) -> Tensor:
    """Sort by modulus, descending; ties by imaginary part, descending (conjugate pairs +, −)."""
    lam = lam[torch.argsort(lam.imag, descending=True, stable=True)]
    return lam[torch.argsort(lam.abs(), descending=True, stable=True)]


# ---- the Jacobian spectrum ------------------------------------------------------------------------

@dataclass
class JacobianSpectrum:
    """The k leading eigenvalues of J = ∂F/∂h at a state.

    radius: |eigenvalues[0]|, the spectral radius of J; eigenvalues: complex128 numpy array,
    by modulus, descending; method: "dense", "krylov", "arnoldi" or "power"; dim: n, the size of the
    state vector; jvps: Jacobian-vector products spent (n for dense).
    """

    radius: float
    eigenvalues: np.ndarray
    method: str
    dim: int
    jvps: int

    def to_dict(self) -> dict[str, Any]:
        return {"radius": self.radius, "eigenvalues_re": self.eigenvalues.real.tolist(),
                "eigenvalues_im": self.eigenvalues.imag.tolist(), "method": self.method,
                "dim": self.dim, "jvps": self.jvps}


def _default_tol(h: Tensor) -> float:
    """Convergence tolerance relative to |λ₁|: 1e-8, or 100 ulps of the JVPs' dtype if coarser
    (a float32 JVP is itself linear only to a few ulps)."""
    return max(1e-8, 100 * torch.finfo(h.dtype).eps)


def _dense(f: Map, h: Tensor, chunk_size: int | None) -> tuple[Tensor, int]:
    """All n eigenvalues of J, formed from the columns J eᵢ, chunk_size unit vectors at a time."""
    n = h.numel()
    eye = torch.eye(n, dtype=h.dtype, device=h.device).view(n, *h.shape)
    columns = [batched_jvp(f, h, chunk)[1] for chunk in eye.split(chunk_size or n)]
    J = torch.cat(columns).reshape(n, n).T
    return _eigvals(J.to(torch.float64)), n


def _arnoldi(f: Map, h: Tensor, k: int, tol: float, maxiter: int | None, seed: int) -> tuple[Tensor, int]:
    """ARPACK (scipy.sparse.linalg.eigs, which="LM") on a LinearOperator whose matvec is one
    JVP. ARPACK works in float64 on the host; each x is cast to h's dtype and device, so the
    attainable accuracy is that of the JVP's dtype (hence tol is at least 100 of its ulps).
    Caveat of every Krylov method: where moduli cluster (a disk of eigenvalues) it may return
    a slightly smaller eigenvalue in place of a larger one among the k; ρ = |λ₁| is the most
    reliable. method="dense" is the reference when in doubt."""
    n, count = h.numel(), 0

    def matvec(x: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        v = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(h.shape)).to(h)
        with torch.no_grad(), math_attention():
            Jv = jvp(f, (h,), (v,))[1]
        return Jv.reshape(-1).to(device="cpu", dtype=torch.float64).numpy()

    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = orthonormal_rows(n, 1, seed)[0].numpy()
    try:
        lam = scipy.sparse.linalg.eigs(op, k=k, which="LM", v0=v0, tol=tol, maxiter=maxiter,
                                       return_eigenvectors=False)
    except scipy.sparse.linalg.ArpackNoConvergence as err:
        raise RuntimeError(f"ARPACK did not converge after {count} JVPs (tol {tol:g}); raise maxiter, "
                           "loosen tol, or use method='dense' for a small state") from err
    return torch.from_numpy(lam), count


def _apply(f: Map, h: Tensor, V: Tensor) -> Tensor:
    """J V for a basis V of shape (n, p): one batched JVP of its p columns."""
    p = V.shape[1]
    _, Z = batched_jvp(f, h, V.T.to(h.dtype).reshape(p, *h.shape))
    return Z.reshape(p, -1).T.to(V.dtype)


def _ritz(V: Tensor, W: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz on span V (orthonormal n × p) given W = J V, in float64:

        H = Vᵀ W,   H yᵢ = θᵢ yᵢ (‖yᵢ‖ = 1),   residual ‖W yᵢ − θᵢ V yᵢ‖

    Returns all θᵢ and their yᵢ by modulus, descending, and the residuals of the first k."""
    V, W = V.double(), W.double()
    theta, Y = torch.linalg.eig(V.T @ W)
    order = torch.argsort(theta.abs(), descending=True, stable=True)
    theta, Y = theta[order], Y[:, order]
    WY = torch.complex(W @ Y[:, :k].real, W @ Y[:, :k].imag)
    VY = torch.complex(V @ Y[:, :k].real, V @ Y[:, :k].imag)
    return theta, Y, (WY - VY * theta[:k]).norm(dim=0)


def _power(f: Map, h: Tensor, k: int, tol: float, maxiter: int, seed: int) -> tuple[Tensor, int]:
    """Block power (subspace) iteration with Rayleigh-Ritz, on h's device:

        W = J Q  (p batched JVPs),  Ritz pairs of Qᵀ W,  Q ← orth(W)

    with p = k + 4 vectors; stop when the k leading Ritz residuals are below tol·|θ₁|.
    Converges like |λ_{p+1}/λ_k|ᵗ: fast when the leading eigenvalues stand apart from the
    rest, slow when their moduli cluster (then use "arnoldi")."""
    n = h.numel()
    p = min(n, k + 4)
    Q = orthonormal_rows(n, p, seed).to(device=h.device, dtype=work_dtype(h)).T
    for it in range(1, maxiter + 1):
        W = _apply(f, h, Q)
        theta, _, residual = _ritz(Q, W, k)
        if bool((residual <= tol * theta[0].abs()).all()):
            return theta[:k], it * p
        Q, _ = torch.linalg.qr(W)
    raise RuntimeError(f"power iteration did not converge in {maxiter} iterations ({maxiter * p} JVPs, tol {tol:g}); "
                       "the leading moduli may cluster: use method='krylov'")


def _krylov(f: Map, h: Tensor, k: int, tol: float, maxiter: int, seed: int) -> tuple[Tensor, int]:
    """Restarted block Arnoldi on h's device, b = 8 JVPs per (vmapped) call.

    Grow an orthonormal basis V = [V₀ V₁ ...], V_{j+1} = orth(J V_j ⊥ V), keeping W = J V;
    after each block, Rayleigh-Ritz on span V and stop when the k leading residuals are
    below tol·|θ₁|. Before V would pass m = max(8b, 4k + 2b) columns, restart: keep an
    orthonormal basis C of the invariant subspace of H = Vᵀ W for its leading half (at
    least k + 1) of eigenvalues, V ← V C and W ← W C (no new JVPs), and grow on from the
    last block. A block of b JVPs costs little more than one where per-call overhead
    dominates (small states on a CPU, most states on a GPU), so this spends more JVPs
    than ARPACK but fewer calls, and never leaves the device.
    """
    n, b = h.numel(), min(KRYLOV_BLOCK, h.numel())
    m, gen = min(n, max(8 * b, 4 * k + 2 * b)), torch.Generator().manual_seed(seed)
    V = orthonormal_rows(n, b, seed).to(device=h.device, dtype=work_dtype(h)).T
    W, last, count = _apply(f, h, V), b, b
    for _ in range(maxiter):
        theta, Y, residual = _ritz(V, W, min(k, V.shape[1]))
        if V.shape[1] >= k and bool((residual <= tol * theta[0].abs()).all()):
            return theta[:k], count
        width = min(b, n - V.shape[1])
        if width == 0:
            raise RuntimeError(f"the Krylov basis spans all {n} dimensions but the residuals exceed tol {tol:g}, "
                               "which is below the rounding of the JVPs: loosen tol")
        new = _orthonormal_complement(W[:, -last:][:, :width], V, gen)
        if V.shape[1] + width > m:
            C = _real_basis(Y[:, :max(V.shape[1] // 2, k + 1)]).to(V)
            if C.shape[1] + width > m:
                raise RuntimeError(f"cannot restart a Krylov basis of {m} columns keeping {C.shape[1]}; "
                                   "use method='arnoldi' or 'dense'")
            V, W = V @ C, W @ C
        V, W, last = torch.cat([V, new], 1), torch.cat([W, _apply(f, h, new)], 1), width
        count += width
    raise RuntimeError(f"the Krylov method did not converge in {maxiter} blocks ({count} JVPs, tol {tol:g}); "
                       "raise maxiter or loosen tol")


def _orthonormal_complement(W: Tensor, V: Tensor, gen: torch.Generator) -> Tensor:
    """An orthonormal basis of W's columns made orthogonal to V's (Gram-Schmidt twice, then
    QR). A column with nothing left (J maps it into span V) becomes a random direction, so
    the basis always grows by W's width."""
    for _ in range(2):
        for _ in range(2):
            W = W - V @ (V.T @ W)
        Q, R = torch.linalg.qr(W)
        lost = R.diagonal().abs() <= 1e-6 * W.norm(dim=0).max().clamp_min(torch.finfo(W.dtype).tiny)
        if not bool(lost.any()):
            break
        W = torch.where(lost, torch.randn(W.shape, generator=gen, dtype=torch.float64).to(W), W)
    return Q


def _real_basis(Y: Tensor) -> Tensor:
    """A real orthonormal basis of the span of complex vectors Y and their conjugates: the
    span of their real and imaginary parts (rank-revealing, by SVD)."""
    U, S, _ = torch.linalg.svd(torch.cat([Y.real, Y.imag], 1), full_matrices=False)
    return U[:, S > 1e-8 * S[0]]


def jacobian_spectral_radius(f: Map, h: Tensor, k: int = 6, method: str = "auto", tol: float | None = None,
                             maxiter: int | None = None, seed: int = 0,
                             chunk_size: int | None = None) -> JacobianSpectrum:
    """The k leading eigenvalues of J = ∂f/∂h at h, and ρ(J) = |λ₁|.

    f: any torch map from a state of h's shape to the same shape (a LoopedLM's
    `loop_map(e, tokens)`, or a textbook map). The state is flattened: n = h.numel().
    method:
        "dense"    J from n JVPs (vmapped, `chunk_size` at a time), all eigenvalues (reference)
        "krylov"   restarted block Arnoldi on h's device, 8 batched JVPs per call, matrix-free
        "arnoldi"  ARPACK on the host, one JVP per call, matrix-free (needs k < n − 1)
        "power"    block power iteration on h's device, k + 4 batched JVPs per iteration,
                   matrix-free: for leading eigenvalues that stand apart from the rest
        "auto"     dense when n ≤ 512, else krylov
    Matrix-free methods need a float32 or float64 state; dense takes any float dtype.
    tol: convergence, Ritz residual ‖J x − θ x‖ ≤ tol·|θ₁| (ARPACK: tol·|θ|), default 1e-8 or
    100 ulps of h's dtype if coarser (float32: 1.2e-5); maxiter: Krylov blocks, power
    iterations (default 1000 each) or ARPACK restarts (default 10·n); seed: start vectors.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    checked_map(f, h)
    n = h.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} eigenvalues asked of a {n}-dimensional state; choose 1 ≤ k ≤ {n}")
    if method == "auto":
        method = "dense" if n <= AUTO_DENSE_MAX else "krylov"
    if method != "dense" and torch.finfo(h.dtype).bits < 32:
        raise ValueError(f"matrix-free eigen-solvers need JVPs in float32 or float64, not {h.dtype} (linear only "
                         "to ~1e-2): analyse a float32 copy (model.float()), or use method='dense'")
    if method == "arnoldi" and k >= n - 1:
        raise ValueError(f"ARPACK needs k < n − 1 = {n - 1}; use method='dense' for k = {k}")
    tol = _default_tol(h) if tol is None else tol
    if method == "dense":
        lam, count = _dense(f, h, chunk_size)
    elif method == "krylov":
        lam, count = _krylov(f, h, k, tol, 1000 if maxiter is None else maxiter, seed)
    elif method == "arnoldi":
        lam, count = _arnoldi(f, h, k, tol, maxiter, seed)
    else:
        lam, count = _power(f, h, k, tol, 1000 if maxiter is None else maxiter, seed)
    lam = _by_modulus(lam.to(device="cpu", dtype=torch.complex128))[:k].numpy()
    return JacobianSpectrum(radius=float(abs(lam[0])), eigenvalues=lam, method=method, dim=n, jvps=count)


# ---- the loop of a loop model --------------------------------------------------------------------------

def loop_jacobian(model: LoopModel, tokens: Tensor, depth: int, position: int | None = None,
                  h0: Tensor | None = None, k: int = 6, method: str = "auto", tol: float | None = None,
                  maxiter: int | None = None, seed: int = 0, chunk_size: int | None = None) -> JacobianSpectrum:
    """The Jacobian spectrum of a loop model's loop map at h_depth (LoopedLM or any
    implementation of model/interface.py: a state (B, T, state_dim), two nested states
    concatenated).

    encode(tokens) → h0 (initial_state, or the given one) → depth iterations of F → the k
    leading eigenvalues of ∂F/∂h there. Whole-sequence view (position=None): the state
    (B, T, d) is one vector of size B·T·d; sequences do not interact, so with B > 1 the
    spectrum is the union of the sequences' spectra. Per-token view (position=p): the
    diagonal block ∂F[p]/∂h[p] (see `at_position`), a (B·d)-dimensional map.
    k, method, tol, maxiter, seed, chunk_size: as in jacobian_spectral_radius. Runs on the
    device of model and tokens, in the model's dtype (use model.double() for float64).
    """
    F, h = loop_state(model, tokens, depth, h0)
    if position is not None:
        F, h = at_position(F, h, position)
    return jacobian_spectral_radius(F, h, k=k, method=method, tol=tol, maxiter=maxiter, seed=seed,
                                    chunk_size=chunk_size)
