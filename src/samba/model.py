"""Samba: Mamba-1 (Gu & Dao 2023) in chunks, with an attention readout over the chunk outputs.

    tokens -> embedding -> [chunk 0: stride blocks] -> ... -> [chunk C-1] -> norm_f -> tied head
                                  |                              |
                                  +------ chunk outputs ---------+--> readout -> readout head

A block is pre-norm with the residual stream kept in fp32, as in mamba-ssm:
``residual = residual + mixer(rmsnorm(residual))``; on the kernel path the residual add and the
RMSNorm are one Triton kernel (mamba-ssm's ``layer_norm_fn``), as in mamba-ssm's own blocks.
A chunk's output is the residual stream after its last block, the tensor transformers returns
as ``hidden_states[c*stride + stride-1]``. With ``sparsity_target`` f > 0 the smallest f of each
token's chunk-output vector is set to exactly 0 (``sparsity.keep_largest``), and that sparse
tensor is what flows on: into the next chunk, the readout and (last chunk) the main head.

The mixer keeps mamba-ssm's parameter names, shapes and initialisation, so pretrained
weights load with a renaming of layer indices only (see ``model_files.py``, which builds the
model through the class it is given and never imports this module).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .model_files import load_model, save_model
from .ops import kernels
from .ops.selective_scan import selective_scan_reference
from .sparsity import keep_largest, keep_largest_in_basis, zero_count


@dataclass
class MixerState:
    """What a mixer carries from one token to the next when decoding (constant size)."""

    conv: torch.Tensor  # (B, d_inner, d_conv): the last d_conv inputs of the convolution
    ssm: torch.Tensor  # (B, d_inner, d_state), fp32
    A: torch.Tensor  # (d_inner, d_state) = -exp(A_log), fp32: fixed while decoding, set at each prefill


class MambaMixer(nn.Module):
    """Selective SSM mixer, mamba-ssm's ``Mamba`` (``modules/mamba_simple.py``) without caching."""

    def __init__(self, config: ModelConfig, backend: str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.backend = backend
        d_model, d_inner, d_state, dt_rank = config.d_model, config.d_inner, config.d_state, config.dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_inner, d_state, dt_rank, config.d_conv
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=config.d_conv, groups=d_inner,
                                padding=config.d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

        with torch.no_grad():
            # dt projection: preserve variance; bias so that softplus(bias) ~ LogU[dt_min, dt_max]
            std = dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            # S4D-real initialisation: A = -(1, 2, ..., N) for every channel
            self.A_log.copy_(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
            self.D.fill_(1.0)

    def forward(self, hidden_states: torch.Tensor, state: MixerState | None = None) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model). With ``state`` (decoding's prefill), the conv and
        SSM states after the last token are written into it."""
        Bsz, L, _ = hidden_states.shape
        fast = kernels.use_kernels(self.backend, hidden_states.is_cuda)

        # 1. Input projection straight into the (B, 2*d_inner, L) layout the kernels want
        #    (L contiguous), as mamba-ssm does: W @ h^T, then a view.
        xz = self.in_proj.weight @ hidden_states.reshape(Bsz * L, -1).t()  # (2*d_inner, B*L)
        xz = xz.view(-1, Bsz, L).permute(1, 0, 2)  # (B, 2*d_inner, L)
        A = self.decay()  # (d_inner, N)

        if fast and torch.is_grad_enabled() and state is None:
            # 2-5 fused, with conv and delta recomputed in backward to save memory.
            return kernels.mamba_inner_fn(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, None, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True)

        x, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
        if state is not None:  # the convolution's window after the last token, zeros before the start
            state.conv.copy_(F.pad(x, (self.d_conv - L, 0)) if L < self.d_conv else x[..., L - self.d_conv:])
        # 2. Causal depthwise convolution + SiLU
        if fast:
            x = kernels.causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                         activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :L])
        # 3. Input-dependent dt, B, C
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(Bsz * L, self.d_inner))  # (B*L, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (self.dt_proj.weight @ dt.t()).view(self.d_inner, Bsz, L).permute(1, 0, 2)  # (B, d_inner, L)
        B = B.reshape(Bsz, L, self.d_state).transpose(1, 2).contiguous()  # (B, N, L)
        C = C.reshape(Bsz, L, self.d_state).transpose(1, 2).contiguous()  # (B, N, L)
        # 4. Selective scan, gated by silu(z)
        scan = kernels.selective_scan_fn if fast else selective_scan_reference
        y = scan(x, delta, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                 delta_softplus=True, return_last_state=state is not None)  # (B, d_inner, L)
        if state is not None:
            y, last = y
            state.ssm.copy_(last)
        # 5. Output projection
        return self.out_proj(y.transpose(1, 2))

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MixerState:
        return MixerState(conv=torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype),
                          ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32),
                          A=self.decay().detach())

    def decay(self) -> torch.Tensor:
        """A = -exp(A_log), fp32 (d_inner, d_state): the state's decay rates."""
        return -torch.exp(self.A_log.float())

    def step(self, hidden: torch.Tensor, state: MixerState) -> torch.Tensor:
        """One token: (B, d_model) -> (B, d_model), updating ``state`` in place (recurrent form of
        ``forward``: mamba-ssm's ``Mamba.step``)."""
        fast = kernels.use_kernels(self.backend, hidden.is_cuda)
        x, z = F.linear(hidden, self.in_proj.weight).chunk(2, dim=-1)  # (B, d_inner) each
        conv_weight = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
        if fast:
            x = kernels.causal_conv1d_update(x, state.conv, conv_weight, self.conv1d.bias, "silu")
        else:
            state.conv.copy_(torch.roll(state.conv, shifts=-1, dims=-1))
            state.conv[:, :, -1] = x
            x = F.silu((state.conv * conv_weight).sum(-1) + self.conv1d.bias).to(hidden.dtype)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, d_inner); the bias is added with the softplus
        A = state.A
        if fast:
            y = kernels.selective_state_update(state.ssm, x, dt, A, B, C, self.D, z=z,
                                               dt_bias=self.dt_proj.bias, dt_softplus=True)
        else:
            dt = F.softplus(dt.float() + self.dt_proj.bias.float())  # (B, d_inner)
            state.ssm.copy_(state.ssm * torch.exp(dt[..., None] * A)
                            + (dt * x.float())[..., None] * B.float()[:, None, :])
            y = (state.ssm * C.float()[:, None, :]).sum(-1) + self.D.float() * x.float()
            y = (y * F.silu(z.float())).to(hidden.dtype)
        return self.out_proj(y)


def wide(x: torch.Tensor) -> torch.Tensor:
    """The residual stream's precision: fp32, or fp64 for an fp64 model (tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def final_rms_norm(x: torch.Tensor, norm: nn.RMSNorm, fast: bool) -> torch.Tensor:
    """The final norm: mamba-ssm's Triton RMSNorm on the kernel path (one kernel each way)."""
    if fast:
        return kernels.layer_norm_fn(x, norm.weight, None, eps=norm.eps, is_rms_norm=True)
    return norm(x)


# One compiled function shared by every norm (compiling each module would recompile per layer).
_compiled_rms_norm = None


def compiled_rms_norm():
    global _compiled_rms_norm
    if _compiled_rms_norm is None:
        _compiled_rms_norm = torch.compile(rms_norm, dynamic=False)
    return _compiled_rms_norm


class Block(nn.Module):
    """Pre-norm residual block: residual + mixer(rmsnorm(residual)), residual in fp32.

    Written as mamba-ssm writes it, so that the add and the norm fuse: a block takes the
    previous block's mixer output and the residual before it, and returns its own pair.
    """

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MambaMixer(config, backend)
        self.norm_fn = rms_norm

    def add_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        """(rmsnorm(hidden + residual), hidden + residual in fp32); residual None: hidden alone."""
        if kernels.use_kernels(self.mixer.backend, hidden.is_cuda):
            return kernels.layer_norm_fn(hidden, self.norm.weight, None, residual=residual, prenorm=True,
                                         residual_in_fp32=True, eps=self.norm.eps, is_rms_norm=True)
        residual = wide(hidden) if residual is None else residual + hidden  # promotes to fp32
        return self.norm_fn(residual, self.norm), residual

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                state: MixerState | None = None):
        normed, residual = self.add_norm(hidden, residual)
        return self.mixer(normed, state), residual

    def step(self, hidden: torch.Tensor, residual: torch.Tensor | None, state: MixerState):
        """One token of ``forward``: (B, d_model) pairs."""
        normed, residual = self.add_norm(hidden, residual)
        return self.mixer.step(normed, state), residual


class Chunk(nn.Module):
    """``readout_stride`` consecutive blocks; its output feeds the readout."""

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.layers = nn.ModuleList(Block(config, backend) for _ in range(config.readout_stride))

    def forward(self, x: torch.Tensor, states: Sequence[MixerState] | None = None) -> torch.Tensor:
        """The residual stream entering the chunk (fp32) -> the stream after its last block."""
        hidden, residual = x, None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, None if states is None else states[i])
        return residual + hidden  # fp32: the add promotes, no separate cast

    def step(self, x: torch.Tensor, states: Sequence[MixerState]) -> torch.Tensor:
        hidden, residual = x, None
        for layer, state in zip(self.layers, states):
            hidden, residual = layer.step(hidden, residual, state)
        return residual + hidden


class Readout(nn.Module):
    """Attention over one position's chunk outputs, then a projection to the vocabulary.

    At position t the query comes from the last chunk's output, keys and values from every
    chunk's output at that same t; the softmax runs over the C chunks. Nothing mixes
    positions, so readout logits at t depend only on tokens <= t (the backbone is causal).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.d_model, config.readout_hidden_dim
        self.norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.query = nn.Linear(d, h)
        # No key bias: a shift shared by all C keys adds the same q.b to every score, which the
        # softmax cancels, so its gradient is exactly 0.
        self.key = nn.Linear(d, h, bias=False)
        self.value = nn.Linear(d, h)
        self.head = nn.Linear(h, config.vocab_size, bias=False)
        self.scale = h ** -0.5

    def features(self, chunk_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """C tensors (..., d_model) -> attended features (..., readout_hidden_dim)."""
        x = self.norm(torch.stack(list(chunk_outputs), dim=-2))  # (..., C, D)
        q = self.query(x[..., -1, :])  # (..., H)
        k, v = self.key(x), self.value(x)  # (..., C, H)
        # One query against C (= 6) keys per position. Written out rather than through
        # scaled_dot_product_attention: its kernels are built for long sequences, and for this
        # shape its backward alone took 11 ms of a 108 ms training step on an H200.
        scores = (q.unsqueeze(-2) * k).float().sum(-1) * self.scale  # (..., C)
        weights = scores.softmax(dim=-1)
        return (weights.unsqueeze(-1).to(v.dtype) * v).sum(-2)  # (..., H)

    def forward(self, chunk_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(chunk_outputs))  # (B, L, V)


@dataclass
class SambaOutput:
    logits: torch.Tensor  # (B, L, V) fp32, main head
    readout_logits: torch.Tensor  # (B, L, V) fp32, readout head
    chunk_outputs: tuple[torch.Tensor, ...]  # C x (B, L, d_model) fp32


class Samba(nn.Module):
    """The Samba language model. ``Samba.from_pretrained(path)`` loads weights."""

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        if backend not in kernels.BACKENDS:
            raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
        self.config = config
        self.backbone_frozen = False
        self.compiled = False  # see compile_parts()
        # The fraction of each chunk-output vector zeroed now: config.sparsity_target, except
        # while training ramps it up or evaluation sweeps it. A device tensor, so changing it
        # needs no new shapes (CUDA graphs stay valid); ``sparse`` says whether to apply it.
        self.register_buffer("sparsity_fraction", torch.tensor(float(config.sparsity_target)),
                             persistent=False)
        self.sparsity_value = float(config.sparsity_target)  # the same, on the host
        self.sparse = config.sparsity_target > 0
        # Evaluation only (the prune curve in each chunk's PCA basis): per chunk an orthonormal
        # basis and how many coordinates to zero in it, after the model's own sparsity.
        self.prune_basis: tuple[torch.Tensor, ...] | None = None
        self.prune_basis_zeros = 0
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.chunks = nn.ModuleList(Chunk(config, backend) for _ in range(config.n_chunks))
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.readout = Readout(config)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        # mamba-ssm's _init_weights: embedding N(0, 0.02); out_proj rescaled by 1/sqrt(n_layers)
        nn.init.normal_(self.embedding.weight, std=0.02)
        for block in self.blocks():
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            block.mixer.out_proj.weight /= math.sqrt(self.config.n_layers)
        nn.init.normal_(self.readout.head.weight, std=0.02)

    def blocks(self) -> list[Block]:
        """The n_layers blocks in order: layer i is chunk i // stride, position i % stride."""
        return [layer for chunk in self.chunks for layer in chunk.layers]

    def set_backend(self, backend: str) -> None:
        if backend not in kernels.BACKENDS:
            raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
        for block in self.blocks():
            block.mixer.backend = backend

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Train only the readout: embedding (= tied head), blocks and final norm stop learning."""
        self.backbone_frozen = frozen
        for module in (self.embedding, self.chunks, self.norm_f):
            module.requires_grad_(not frozen)

    def compile_parts(self) -> None:
        """torch.compile what is not a mamba-ssm kernel: the norms, the readout's attention and
        the softmax work of the sliced cross-entropies. The kernels themselves stay as they are."""
        self.compiled = True
        for block in self.blocks():
            block.norm_fn = compiled_rms_norm()
        self.readout.features = torch.compile(self.readout.features)

    def set_sparsity_target(self, target: float) -> None:
        """Make ``target`` part of the model (its config, saved with it, applied at inference)."""
        self.config = dataclasses.replace(self.config, sparsity_target=target)
        self.set_sparsity(None)

    def set_sparsity(self, fraction: float | None) -> None:
        """Zero the smallest ``fraction`` of each chunk-output vector from now on; None: back to
        the model's own ``config.sparsity_target``."""
        fraction = self.config.sparsity_target if fraction is None else fraction
        if not 0 <= fraction < 1:
            raise ValueError(f"sparsity fraction must be in [0, 1), got {fraction}")
        self.sparsity_fraction.fill_(fraction)
        self.sparsity_value = float(fraction)
        self.sparse = fraction > 0 or self.config.sparsity_target > 0

    def set_prune_basis(self, bases: Sequence[torch.Tensor] | None, fraction: float = 0.0) -> None:
        """From now on also zero the smallest ``fraction`` of each chunk output's coordinates in
        that chunk's orthonormal basis (``bases``: n_chunks tensors (d_model, d_model), columns
        the basis vectors), after the model's own sparsity; None: no longer. For evaluation."""
        if bases is not None:
            d = self.config.d_model
            if len(bases) != self.config.n_chunks or any(tuple(b.shape) != (d, d) for b in bases):
                raise ValueError(f"need {self.config.n_chunks} bases of shape ({d}, {d})")
            if not 0 <= fraction < 1:
                raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
        self.prune_basis = None if bases is None else tuple(bases)
        self.prune_basis_zeros = 0 if bases is None else zero_count(fraction, self.config.d_model)

    def sparsify(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Chunk ``chunk``'s output as it flows on: x itself, or x with its smallest entries
        zeroed (and, with a prune basis, its smallest coordinates in that basis too).

        Training reads the fraction from the device tensor (it ramps while a captured CUDA
        graph stays valid); evaluation and decoding, with a fixed fraction, pass it as a number
        (``keep_largest`` then takes the cheaper top-k path)."""
        if self.sparse:
            fraction = self.sparsity_fraction if self.training else self.sparsity_value
            x = keep_largest(x, zero_count(fraction, x.shape[-1]))
        if self.prune_basis is not None:
            x = keep_largest_in_basis(x, self.prune_basis_zeros, self.prune_basis[chunk])
        return x

    def chunk_outputs(self, input_ids: torch.Tensor, return_dense: bool = False,
                      states: Sequence[Sequence[MixerState]] | None = None, step: bool = False):
        """(B, L) token ids -> C residual-stream tensors (B, L, d_model), fp32, as they flow on
        (sparsified). With ``return_dense`` also the same C tensors before sparsification.

        Decoding (``generate.Decoder``) passes ``states``, one list of layer states per chunk: the
        chunks read (B, L) ids in parallel and leave each layer's state after the last token
        there (the prefill); with ``step`` the ids are (B,), one token each, every state advances
        by that token, and the C tensors are (B, d_model)."""
        if input_ids.dim() != (1 if step else 2):
            raise ValueError(f"input_ids must be {'(batch,)' if step else '(batch, length)'}, "
                             f"got shape {tuple(input_ids.shape)}")
        if step and states is None:
            raise ValueError("a step needs the decoding states")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            x = wide(self.embedding(input_ids))  # (B, L, D), or (B, D) for a step
            outputs, dense = [], []
            for c, (chunk, chunk_states) in enumerate(zip(self.chunks, states or [None] * len(self.chunks))):
                dense.append(chunk.step(x, chunk_states) if step else chunk(x, chunk_states))
                x = self.sparsify(dense[-1], c)
                outputs.append(x)
        return (tuple(outputs), tuple(dense)) if return_dense else tuple(outputs)

    def final_hidden(self, chunk_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The main head's input: norm_f of the last residual stream, (B, L, d_model)."""
        x = chunk_outputs[-1]
        fast = kernels.use_kernels(self.chunks[0].layers[0].mixer.backend, x.is_cuda)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            return final_rms_norm(x, self.norm_f, fast)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embedding.weight  # tied

    def forward(self, input_ids: torch.Tensor) -> SambaOutput:
        chunk_outputs = self.chunk_outputs(input_ids)
        logits = F.linear(self.final_hidden(chunk_outputs), self.lm_head_weight).float()
        readout_logits = self.readout(chunk_outputs).float()
        return SambaOutput(logits=logits, readout_logits=readout_logits, chunk_outputs=chunk_outputs)

    # Loading and saving live in model_files.py (which is handed this class, so that it never
    # imports this module); these are the public entry points.
    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "auto", device: str | torch.device | None = None,
                        **overrides) -> "Samba":
        """Load a Samba directory, or a transformers / mamba-ssm Mamba checkpoint (dir or Hub id).

        ``overrides`` set ModelConfig keys a Mamba checkpoint lacks (readout_stride,
        readout_hidden_dim); architecture keys must agree with the checkpoint. ``device``: where
        the model is returned (a Samba directory's model is built there directly, no random
        initialisation on the CPU first, since the file holds every weight).
        """
        return load_model(cls, path, backend=backend, device=device, **overrides)

    def save_pretrained(self, path: str | Path, extra_files: dict[str, Path] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (and ``extra_files``: name -> source
        file, e.g. the tokenizer) to ``path``, replacing it only once complete."""
        save_model(self, path, extra_files)
