"""The reference model: frozen (normal objectives) or synced with the policy (humanline).

Humanline syncing overwrites the reference with the policy's *pre-update* weights every ``sync_every``
optimizer steps. The trainer calls :meth:`Reference.maybe_sync` after backward and gradient clipping, just
before ``optimizer.step()`` (the HALOs timing), so during step t the reference is the policy of step t-1
(k = 1), and on the first step every log-ratio is 0.

How the reference is held:

* full fine-tuning: a second copy of the model, never trained, always in eval mode. Under DDP every process
  holds a full copy (the policy's unwrapped weights are identical on all ranks, so each copies locally).
  Under FSDP the copy is sharded like the policy (``sharding.shard_like_policy``): matching shards, not a
  full copy. Each process holds its shard of every reference parameter, the same slice as its shard of
  the policy's, so a sync is a local shard copy (no communication), the reference forward gathers its
  parameters unit by unit as the policy's does, and saving its weights is a collective (every process calls
  :meth:`Reference.state_dict`). After the policy is prepared the trainer calls :meth:`Reference.copy_from`,
  so the reference starts from exactly the weights the policy starts from. Under DeepSpeed ZeRO-3 the copy is a
  second ZeRO-3 engine (``zero3.reference_engine``) whose partitions line up with the policy's, and a sync copies
  each process's partitions (``sharding.local`` gives ``p.ds_tensor``) the same way.
* LoRA: the frozen reference is the base model with the adapter disabled (the *initial* model). A synced
  reference is a second copy of the adapter weights only; for its forward the copy is swapped into the
  adapter's parameters and swapped back afterwards (pointer swaps, no copies).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .logprobs import sequence_logprobs
from .sharding import full_state_dict, is_sharded, load_full_state_dict, local


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _layout(t: Tensor) -> tuple:
    """How a (DTensor) parameter is split over the processes; () for a plain tensor."""
    mesh = getattr(t, "device_mesh", None)
    return () if mesh is None else (tuple(mesh.mesh.flatten().tolist()), tuple(t.placements))


class Reference:
    """Log-probs under the reference model, and its syncing with the policy.

    ``mode``: "frozen" (the initial model), "sync" (copy of the policy every ``sync_every`` steps) or "ema"
    (``ref = alpha * policy + (1 - alpha) * ref`` every ``sync_every`` steps, TR-DPO style).
    """

    def __init__(self, policy: nn.Module, mode: str = "frozen", *, sync_every: int = 1, ema_alpha: float = 1.0,
                 prepare: Callable[[nn.Module], nn.Module] | None = None) -> None:
        if mode not in ("frozen", "sync", "ema"):
            raise ValueError(f"unknown reference mode {mode!r}")
        self.mode, self.sync_every, self.ema_alpha = mode, sync_every, ema_alpha
        self.last_sync_step = 0  # the policy step whose start the reference's weights equal
        self.synced_once = False  # weights differ from the initial model (then they go into checkpoints)
        policy = _unwrap(policy)
        self.peft = _is_peft(policy)
        self.model: nn.Module | None = None
        self.adapter: dict[str, Tensor] = {}
        if self.peft:
            if mode != "frozen":
                self.adapter = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        else:
            ref = copy.deepcopy(policy)
            ref.requires_grad_(False)
            ref.eval()
            self.model = prepare(ref) if prepare is not None else ref

    # --- forward ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def logps(self, policy: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Reference log-probs [N, T-1] of the shifted labels; no activations are kept."""
        if self.model is not None:
            logps, _ = sequence_logprobs(self.model, input_ids, attention_mask, labels)
            return logps
        base = _unwrap(policy)
        with _eval_mode(base):
            if not self.adapter:
                with base.disable_adapter():
                    logps, _ = sequence_logprobs(base, input_ids, attention_mask, labels)
            else:
                with self._swapped_adapter(base):
                    logps, _ = sequence_logprobs(base, input_ids, attention_mask, labels)
        return logps

    @contextmanager
    def _swapped_adapter(self, base: nn.Module) -> Iterator[None]:
        params = dict(base.named_parameters())
        for name, tensor in self.adapter.items():
            params[name].data, self.adapter[name] = tensor, params[name].data
        try:
            yield
        finally:
            for name, tensor in self.adapter.items():
                params[name].data, self.adapter[name] = tensor, params[name].data

    # --- syncing -----------------------------------------------------------------------------------------
    def should_sync(self, step: int) -> bool:
        """Sync during optimizer step ``step`` (0-based) every ``sync_every`` steps."""
        return self.mode != "frozen" and (step + 1) % self.sync_every == 0

    def lag(self, step: int) -> int:
        """How many optimizer steps old the reference's weights are during step ``step``."""
        return step - self.last_sync_step

    @torch.no_grad()
    def maybe_sync(self, policy: nn.Module, step: int) -> bool:
        """Copy (or EMA-mix) the policy's current, pre-update weights into the reference when due.

        Called after backward and clipping, before ``optimizer.step()``: the weights copied are those the
        policy had at the start of step ``step``; after the update the reference lags by one step.
        """
        if not self.should_sync(step):
            return False
        self._copy(policy, self.ema_alpha if self.mode == "ema" else 1.0)
        self.last_sync_step = step
        self.synced_once = True
        return True

    @torch.no_grad()
    def copy_from(self, policy: nn.Module) -> None:
        """Set the reference to the policy's current weights without counting it as a sync (the start of
        training: a sharded reference then holds exactly the shards the prepared policy starts from)."""
        if self.model is not None:
            self._copy(policy, 1.0)

    def _copy(self, policy: nn.Module, alpha: float) -> None:
        for ref_p, pol_p in self._pairs(policy):
            if alpha == 1.0:
                ref_p.copy_(pol_p.detach())
            else:
                ref_p.lerp_(pol_p.detach().to(ref_p.dtype), alpha)

    def _pairs(self, policy: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
        base = _unwrap(policy)
        if self.peft:
            params = dict(base.named_parameters())
            for name, tensor in self.adapter.items():
                yield tensor, params[name]
        else:
            assert self.model is not None
            # An FSDP1 wrapper holds its own (flat) parameters: only DDP-style wrappers are stripped.
            ref_params = list((self.model if is_sharded(self.model) else _unwrap(self.model)).parameters())
            pol_params = list((policy if is_sharded(policy) else base).parameters())
            if len(ref_params) != len(pol_params):
                raise RuntimeError("reference and policy have different parameter lists")
            # Sharded (FSDP): this process's shards, which line up one to one (same slices of the same
            # parameters); a copy between them is local.
            for ref_p, pol_p in zip(ref_params, pol_params):
                ref_l, pol_l = local(ref_p), local(pol_p)
                if ref_l.shape != pol_l.shape or _layout(ref_p) != _layout(pol_p):
                    raise RuntimeError(f"reference and policy shards differ in shape ({tuple(ref_l.shape)} vs "
                                       f"{tuple(pol_l.shape)}): the reference is not sharded like the policy")
                yield ref_l, pol_l

    # --- checkpoint state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor] | None:
        """The reference's weights when they differ from the initial model, else None.

        Sharded: a collective (every process calls it); the main process gets the full weights."""
        if not self.synced_once:
            return None
        if self.peft:
            return {k: v.detach().cpu().contiguous() for k, v in self.adapter.items()}
        assert self.model is not None
        if is_sharded(self.model):
            return {k: v.contiguous() for k, v in full_state_dict(self.model).items()}
        return {k: v.detach().cpu().contiguous() for k, v in _unwrap(self.model).state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor] | None, last_sync_step: int) -> None:
        self.last_sync_step = last_sync_step
        if state is None:
            return
        self.synced_once = True
        if self.peft:
            for k in self.adapter:
                self.adapter[k].copy_(state[k])
        else:
            assert self.model is not None
            if is_sharded(self.model):
                load_full_state_dict(self.model, state)  # each process keeps its shards
            else:
                _unwrap(self.model).load_state_dict(state, strict=False)
