"""FSDP2 for the stages: load a model sharded over the processes, and move its state in and out whole.

One layout serves every stage. Each decoder layer (the classes in the model's `_no_split_modules`,
accelerate's transformer-based wrap) is an FSDP unit; the `HiddenAndHead` wrapper is the root unit,
holding the embeddings, the final norm and the head. The fused losses run inside the root's forward
(`HiddenAndHead(..., head_fn=...)`), so the head weight they read is the one FSDP gathered for that
forward, in the compute dtype of its MixedPrecisionPolicy, and FSDP reduce-scatters its gradient
itself: no DTensor reaches a loss and the head is gathered once per step. (accelerate's own FSDP2
preparation carves the head into a separate unit whose weight a loss outside `lm_head.forward` would
read sharded; so the sharding is applied here, with accelerate launching the processes.)

Weights are read by the main process only: the other ranks build the model on the meta device and
receive their shards from it (accelerate's `cpu_ram_efficient_loading`), so a proxy too large for
one device, or for one process's share of host memory, still loads. Checkpoints, phase markers and
saved models hold full (unsharded) tensors, written by the main process: the same files as a
single-process run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .config import StageConfig, TrainConfig
from .modeling import HiddenAndHead, PipelineError, apply_lora, causal_lm, load_model, save_model

T = TypeVar("T")
COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(cfg: StageConfig) -> torch.dtype | None:
    """The autocast / FSDP parameter dtype of `--mixed-precision` (None: the weights' own dtype)."""
    return COMPUTE_DTYPES[cfg.mixed_precision]


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` (a HiddenAndHead) was sharded with FSDP2 by `prepare_model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def agree(acc: Any, fn: Callable[[], T]) -> T:
    """`fn()` on every process; when it raises on any of them, every process raises (none waits forever in a
    collective the failed one never reaches). The failing process re-raises its own error."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except (PipelineError, ValueError, OSError, RuntimeError) as exc:
        error = exc
    if acc is None or acc.num_processes == 1:
        if error is not None:
            raise error
        return result
    from accelerate.utils import gather_object

    messages = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise PipelineError(f"process {rank} failed: {message}")
    return result


class _LocalView:
    """An accelerator seen as a one-process run on its device (what a stage that runs on the main process alone
    hands its helpers, so none of them waits in a collective the other processes never reach)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, acc: Any) -> None:
        self.device = acc.device

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""


def local_view(acc: Any) -> Any:
    """`acc` as a one-process run on this process's device (see `_LocalView`)."""
    return _LocalView(acc)


@functools.cache
def _mesh(device_type: str, world: int) -> Any:
    """The 1-D data-parallel device mesh FSDP shards over (one per process and device type)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def prepare_model(path: str, cfg: StageConfig, acc: Any, *, name: str, train: bool,
                  lora: dict[str, Any] | None = None, check: Callable[[nn.Module], None] | None = None,
                  ) -> HiddenAndHead:
    """Load model `path` for a stage as a `HiddenAndHead` on the stage's device, FSDP2-sharded under --fsdp.

    `train` False freezes it (and shards it for inference: every layer regathered per forward).
    `lora` wraps it with peft adapters; `check(model)` runs on the loaded model of every process (the
    main one holds the weights, the others a meta copy under FSDP) before anything is sharded.
    """
    sharded = bool(cfg.fsdp)
    meta = sharded and acc.num_processes > 1 and not acc.is_main_process

    def load() -> nn.Module:
        model = load_model(path, cfg.dtype, cfg.attn_implementation, meta=meta)
        if check is not None:
            check(model)
        return model

    model = agree(acc, load)
    if train:
        model = apply_lora(model, lora)
    else:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    if not sharded:
        return HiddenAndHead(model.to(acc.device), autocast=compute_dtype(cfg), packing=cfg.packing)
    full = None if meta else model.state_dict()  # the main process's weights, broadcast once sharded
    wrapper = HiddenAndHead(model, packing=cfg.packing)
    shard(wrapper, acc, cfg, train=train)
    if meta:
        wrapper.to_empty(device=acc.device)
    if acc.num_processes > 1:
        load_full_state(wrapper.model, full, acc)
        _broadcast_buffers(wrapper)
    if not train:
        wrapper.eval()
    return wrapper


def shard(wrapper: HiddenAndHead, acc: Any, cfg: StageConfig, train: bool) -> None:
    """Apply FSDP2 in place: each decoder layer one unit, the wrapper the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    lm = causal_lm(wrapper.model)
    classes = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in wrapper.modules() if type(m).__name__ in classes]
    if not layers:
        raise PipelineError(f"--fsdp: cannot find the decoder layers of {type(lm).__name__} (its _no_split_modules "
                            f"{sorted(classes)} names no submodule): this model cannot be sharded")
    dtype = compute_dtype(cfg)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    # Inference models always regather per layer: nothing would free a layer kept gathered after its forward.
    reshard = not train or cfg.fsdp == "full_shard"
    mesh = _mesh(acc.device.type, acc.num_processes)
    for layer in reversed(layers):  # innermost first: FSDP needs children sharded before their parents
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(wrapper, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(wrapper, "generate")


def _broadcast_buffers(wrapper: nn.Module) -> None:
    """Every buffer from the main process (non-persistent ones, e.g. rotary frequencies, are in no state dict)."""
    import torch.distributed as dist

    for buf in wrapper.buffers():
        dist.broadcast(buf, src=0)


def release(models: list[nn.Module]) -> None:
    """Free the gathered parameters a no-grad pass left behind (FSDP keeps the root's after its forward)."""
    from torch.distributed.fsdp import FSDPModule

    for model in models:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def _local(t: Tensor) -> Tensor:
    """A DTensor's full value (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(state: Mapping[str, Tensor], acc: Any) -> dict[str, Tensor]:
    """Full CPU copies of a (sharded) state dict on the main process ({} elsewhere); a collective under FSDP."""
    main = acc is None or acc.is_main_process
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        value = _local(v).detach()
        if main:
            out[k] = value.to("cpu", copy=True)
    return out


def model_state(model: nn.Module, acc: Any) -> dict[str, Tensor]:
    """The model's full state dict (main process; {} elsewhere under FSDP): what checkpoints and markers hold."""
    return full_state(model.state_dict(), acc) if _has_dtensors(model) else dict(model.state_dict())


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the model's weights as they are stored (this process's shards under FSDP), to restore later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_full_state(model: nn.Module, full: Mapping[str, Tensor] | None, acc: Any) -> None:
    """Load a full state dict held by the main process (the others pass None) into a sharded or plain model."""
    if not _has_dtensors(model):
        model.load_state_dict(dict(full or {}))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(full or {}) if acc.is_main_process else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def distribute_like(full: Mapping[str, Tensor] | None, like: Mapping[str, Tensor], acc: Any) -> dict[str, Tensor]:
    """The main process's full tensors `full` split like `like` (a sharded state dict) on every process."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out: dict[str, Tensor] = {}
    for k, ref in like.items():
        if isinstance(ref, DTensor):
            shape, dtype = ref.shape, ref.dtype
            src = full[k] if acc.is_main_process and full is not None else torch.empty(shape, dtype=dtype)
            out[k] = distribute_tensor(src.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements,
                                       src_data_rank=0)
        else:
            value = full[k] if acc.is_main_process and full is not None else ref.detach().clone()
            out[k] = broadcast_tensor(value.to(ref.device), acc)
    return out


def broadcast_tensor(t: Tensor, acc: Any) -> Tensor:
    """The main process's value of `t` on every process."""
    if acc is not None and acc.num_processes > 1:
        import torch.distributed as dist

        dist.broadcast(t, src=0)
    return t


def broadcast_object(obj: T, acc: Any) -> T:
    """The main process's `obj` (small, picklable: decisions and JSON-like state) on every process."""
    if acc is None or acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, acc: Any) -> dict[str, Any]:
    """The optimizer's state for a checkpoint: `state_dict()`, or under FSDP the full one keyed by parameter name."""
    if not _has_dtensors(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None,
                         acc: Any) -> None:
    """Restore what `optimizer_state` saved (under FSDP the main process holds it and broadcasts it)."""
    if not _has_dtensors(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state if acc.is_main_process else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _has_dtensors(model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def no_sync(acc: Any, prepared: nn.Module, skip: bool) -> Iterator[None]:
    """Within the block, gradients are accumulated locally (`skip`): DDP's no_sync, or FSDP2's
    set_requires_gradient_sync(False) (reduce-scatter once, at the last micro-batch)."""
    if not skip:
        yield
    elif is_sharded(prepared):
        prepared.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            prepared.set_requires_gradient_sync(True)
    else:
        with acc.no_sync(prepared):
            yield


def grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' global norm to `max_norm` (0: measure only) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(_local(norm))


def make_scaler(cfg: TrainConfig, acc: Any) -> Any:
    """fp16's dynamic loss scaler (None for bf16 / fp32): torch's GradScaler, or with several processes its
    sharded form, whose inf/NaN check is agreed by every process (each sees other shards under FSDP)."""
    if cfg.mixed_precision != "fp16":
        return None
    if acc.num_processes > 1:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=acc.device.type)
    return torch.amp.GradScaler(acc.device.type)


def save_trained(wrapper: HiddenAndHead, tokenizer: Any, path: str, acc: Any) -> None:
    """Save the model `from_pretrained`-loadable (LoRA merged) from the main process; a collective under FSDP."""
    if not _has_dtensors(wrapper.model):
        if acc is None or acc.is_main_process:
            save_model(wrapper.model, tokenizer, path)
        return
    full = model_state(wrapper.model, acc)
    if acc.is_main_process:
        save_model(unsharded_copy(wrapper.model, full), tokenizer, path)


def unsharded_copy(model: nn.Module, full: Mapping[str, Tensor]) -> nn.Module:
    """A plain CPU copy of `model` (a causal LM, possibly with peft adapters) holding the weights `full`."""
    from transformers import AutoModelForCausalLM

    lm = causal_lm(model)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(lm.config, dtype=next(iter(full.values())).dtype)
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        from peft import get_peft_model

        fresh = get_peft_model(fresh, peft_config["default"])
    fresh = fresh.to_empty(device="cpu")
    fresh.load_state_dict(dict(full), strict=True)
    fresh.generation_config = lm.generation_config
    return fresh


__all__ = ["agree", "compute_dtype", "is_sharded", "prepare_model", "release", "shard"]
