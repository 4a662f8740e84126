"""Per-rank memory of each pipeline stage for the paper's models (Llama-2 7B / 13B / 70B): a plan, not a measurement.

    python benchmarks/memory_plan.py                      # every stage, 1/2/4/8 ranks, 24/40/80 GB GPUs
    python benchmarks/memory_plan.py --tokens 2048 --markdown

The models are built from their public configs (benchmarks/model_configs/) on the meta device, so nothing is
downloaded or allocated. From the modules themselves come the parameter counts of each FSDP2 unit (the
stages' layout: every decoder layer a unit, the root holding the embeddings, the final norm and the head);
from tracing one decoder layer on meta tensors come the bytes it saves for backward (attention counted as
the flash kernels save it, as SDPA does on GPUs and on CPUs: q, k, v, output, row log-sum-exp). The fused
loss's workspace uses the losses' own sizing rule (`proxykd_fast.losses._gemm.default_chunk_rows`, so
DEFAULT_WORKSPACE_BYTES on the device), and its saved state (fp32 dW, dX) their one-pass design.

A training step's peak is the persistent state (parameter shards, optimizer state) plus the largest of
its phases: forward and loss (gathered units, every saved activation, the loss workspace), backward
(activations, the head's gradient, one layer's gathered parameters, their gradient and reduce-scatter
buffer, the gradients of one layer's MLP activations) and the optimizer step (gradient shards and
foreach AdamW's two temporaries per parameter). tests/benchmarks/test_memory_plan.py checks this against a measured FSDP2 step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().with_name("model_configs")
GiB = 2**30
GPU_GB = (24, 40, 80)
WORLDS = (1, 2, 4, 8)
RESERVED = 2 * GiB  # CUDA context, NCCL buffers and allocator fragmentation kept free on every GPU
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# [rows, V] fp32 buffers each loss's epilogue asks the chunk engine for (proxykd_fast.losses: _epilogue_torch
# buffers(), _rows.chunked_topk / log-probs, _preference.token_pass)
LOSS_BUFFERS = {"ce": 1, "kd_offline": 1, "kd_online": 3, "dpo": 1, "topk": 1, "logprobs": 1}


@dataclass(frozen=True)
class Shape:
    """What the plan needs to know of a causal LM, counted from its modules."""

    name: str
    params: int
    root_params: int  # embeddings, final norm and head: the FSDP root unit
    layer_params: int  # one decoder layer (each its own unit)
    layers: int
    hidden: int
    vocab: int
    kv_dim: int  # key/value heads x head dim (the KV cache per token per layer, each of K and V)
    lora_params: int  # trainable parameters of LoRA r=16 on every linear layer but the head
    config: Any = field(repr=False, compare=False, default=None)


@dataclass(frozen=True)
class Flags:
    """The stage flags the plan covers (the names of the pipeline options)."""

    world: int = 1
    fsdp: bool = False
    mixed_precision: str = "bf16"  # no | bf16 | fp16
    dtype: str = "float32"  # the stored weights: fp32 master weights under mixed precision
    gradient_checkpointing: bool = False
    lora: bool = False
    device: str = "cuda"

    def describe(self) -> str:
        """The command-line flags, as a user would pass them."""
        parts = [f"{self.world}x", "--fsdp" if self.fsdp else "DDP" if self.world > 1 else "1 GPU"]
        if self.mixed_precision != "no":
            parts.append(f"--mixed-precision {self.mixed_precision}")
        parts.append(f"--dtype {self.dtype}")
        if self.gradient_checkpointing:
            parts.append("--gradient-checkpointing")
        if self.lora:
            parts.append("--lora r=16")
        return " ".join(parts)


def load_config(name_or_path: str | Path) -> Any:
    """A LlamaConfig from one of benchmarks/model_configs/ (by name) or a config.json path."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if not path.exists():
        path = CONFIGS / f"{name_or_path}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return AutoConfig.for_model(data.pop("model_type"), **data)


def build_meta(config: Any) -> torch.nn.Module:
    """The causal LM of `config` on the meta device (no memory, no download)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def shape_of(config: Any, name: str = "model") -> Shape:
    """Parameter counts per FSDP unit and the dimensions the plan uses, from the meta model."""
    model = build_meta(config)
    layers = model.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    lora = sum(16 * (m.in_features + m.out_features) for m in layers.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(name, total, total - per_layer * len(layers), per_layer, len(layers), config.hidden_size,
                 config.vocab_size, config.num_key_value_heads * head_dim, lora, config)


@functools.cache
def _layer_trace(config_json: str, tokens: int, seq: int, dtype: str) -> tuple[int, int]:
    """(bytes one decoder layer saves for backward, bytes of its input) at `tokens` tokens in rows of `seq`."""
    from transformers import AutoConfig

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **{**data, "num_hidden_layers": 1})
    model = build_meta(config).to(getattr(torch, dtype))
    model.train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # held until the trace ends, so no storage address is reused meanwhile

    def keep(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        alive.append(t)
        if st._cdata not in params:
            saved[st._cdata] = max(saved.get(st._cdata, 0), st.nbytes())
        return t

    def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        for t in (q, k, v, out):
            keep(t)
        saved[-id(out)] = q.shape[0] * q.shape[1] * q.shape[2] * 4  # the fp32 row log-sum-exp
        return out.requires_grad_(True)

    rows = max(1, tokens // seq)
    x = torch.zeros(rows, seq, config.hidden_size, device="meta", dtype=getattr(torch, dtype), requires_grad=True)
    positions = torch.arange(seq, device="meta")[None].expand(rows, -1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            emb = model.model.rotary_emb(x, positions)
            model.model.layers[0](x, position_embeddings=emb, attention_mask=None, position_ids=positions)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    saved.pop(x.untyped_storage()._cdata, None)  # the layer's input belongs to the previous layer
    return sum(saved.values()), x.numel() * x.element_size()


def layer_activations(shape: Shape, tokens: int, seq: int, dtype: str) -> tuple[int, int]:
    """(saved bytes per decoder layer, its input's bytes) for `tokens` tokens (rows of `seq`) in `dtype`."""
    return _layer_trace(shape.config.to_json_string(), tokens, seq, dtype)


def compute_dtype(flags: Flags) -> str:
    """The dtype activations and gathered parameters have."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(flags.mixed_precision, flags.dtype)


def loss_workspace(vocab: int, rows_total: int, loss: str, device: str, cb: int = 4) -> tuple[int, int]:
    """(bytes of the fused loss's chunk buffers, bytes of its per-chunk temporaries), by the losses' own sizing
    rule: nbuf fp32 [rows, V] buffers, plus, for low-precision weights, one [rows, V] tensor in the weights'
    dtype at a time (the dlogits operand of the gradient GEMMs; on CPU, where no bf16 x bf16 -> fp32 GEMM
    exists, also the logits before their upcast, freed before it)."""
    from proxykd_fast.losses._gemm import default_chunk_rows

    nbuf = LOSS_BUFFERS[loss]
    rows = default_chunk_rows(torch.device(device), nbuf, vocab, max(rows_total, 1))
    temps = 0 if cb == 4 else rows * vocab * cb
    return nbuf * rows * vocab * 4, temps


def naive_logits(shape: Shape, tokens: int, loss: str, cb: int) -> int:
    """What materialised [tokens, V] logits need for the same loss: the logits in the compute dtype, their fp32
    upcast, the saved fp32 log-softmax and its gradient (transformers' loss path); KD adds the proxy's logits
    and fp32 log-probs, the online proxy computing its own."""
    per_token = cb + 4 + 4 + 4
    if loss in ("kd_offline", "kd_online"):
        per_token += 4 + (cb + 4 if loss == "kd_online" else 0)
    if loss in ("topk", "logprobs"):  # no-grad: logits and their fp32 log-softmax
        per_token = cb + 4
    return tokens * shape.vocab * per_token


def plan_train(shape: Shape, flags: Flags, tokens: int, seq: int, loss: str,
               proxy: Shape | None = None) -> dict[str, int]:
    """Per-rank bytes of one training step of `shape` (student or proxy) under `flags`, in steady state."""
    pb, cb = DTYPE_BYTES[flags.dtype], DTYPE_BYTES[compute_dtype(flags)]
    sharded = flags.fsdp and flags.world > 1
    shard = 1 / flags.world if flags.fsdp else 1.0
    trainable = shape.lora_params if flags.lora else shape.params
    layer_trainable = shape.lora_params / shape.layers if flags.lora else shape.layer_params
    act_layer, layer_in = layer_activations(shape, tokens, seq, compute_dtype(flags))
    base = 2 * tokens * shape.hidden * cb  # the embedding output and the final norm's
    if flags.gradient_checkpointing:  # each layer keeps only its input; backward recomputes one layer at a time
        activations, recomputed = shape.layers * layer_in + base, act_layer
    else:
        activations, recomputed = shape.layers * act_layer + base, 0
    buffers, temps = loss_workspace(shape.vocab, tokens, loss, flags.device, cb)
    head = shape.vocab * shape.hidden
    out: dict[str, int] = {
        "parameters": int(shape.params * pb * shard),
        "optimizer": int(2 * trainable * pb * shard),  # AdamW's two moments, in the parameters' dtype
        "gradients": int(trainable * pb * shard),
        "activations": int(activations),
        "loss_workspace": int(buffers + temps),
    }
    # The fused loss's one pass keeps dX and (the head training) an fp32 dW until backward.
    loss_saved = tokens * shape.hidden * cb + (0 if flags.lora else head * 4)
    cached = buffers if flags.device == "cpu" else 0  # the CPU engine keeps its buffers between calls
    # Gathered copies: under FSDP the root unit in the compute dtype for the whole step and one layer (plus one
    # prefetched) at a time; without FSDP, autocast's cached low-precision copies of every weight.
    if sharded:
        root, layer = shape.root_params * cb, shape.layer_params * cb
    else:
        root, layer = (shape.params * cb if cb < pb else 0), 0
    proxy_held = 0
    if proxy is not None:  # the online proxy's no-grad pass: its shards, gathered root, hidden states
        inf = plan_infer(proxy, dataclasses.replace(flags, lora=False, gradient_checkpointing=False), tokens, seq,
                         "kd_online")
        proxy_held = inf["parameters"] + inf["gathered_units"] + tokens * proxy.hidden * cb
        out["proxy"] = int(proxy_held)
    reduce = 4 if flags.mixed_precision != "no" else pb  # FSDP reduces gradients in fp32 under mixed precision
    # a layer's backward holds the gradients of its largest activations: the MLP's three [tokens, intermediate]
    # tensors, and the [tokens, hidden] gradient coming in and going out
    bwd_temps = tokens * (3 * shape.config.intermediate_size + 2 * shape.hidden) * cb
    phases = {
        "loss": root + activations + loss_saved + buffers + temps,
        "head backward": root + activations + loss_saved + cached + tokens * shape.hidden * cb
        + (0 if flags.lora else head * cb + (shape.root_params * reduce if sharded else 0)),
        "layer backward": root + activations + cached + recomputed + bwd_temps + 2 * layer
        + (layer_trainable * (cb + reduce) if sharded else 0) + (0 if flags.lora else shape.root_params * pb * shard),
        "optimizer": cached + out["gradients"] + 2 * trainable * pb * shard,  # foreach AdamW's temporaries
    }
    out["gathered_units"] = int(root + 2 * layer)
    out["peak"] = int(out["parameters"] + out["optimizer"] + proxy_held + max(phases.values()))
    return out


def plan_infer(shape: Shape, flags: Flags, tokens: int, seq: int, loss: str) -> dict[str, int]:
    """Per-rank bytes of a no-grad scoring pass (precompute, eval, reference log-probs)."""
    pb, cb = DTYPE_BYTES[flags.dtype], DTYPE_BYTES[compute_dtype(flags)]
    shard = 1 / flags.world if flags.fsdp else 1.0
    act_layer, layer_in = layer_activations(shape, tokens, seq, compute_dtype(flags))
    gathered = shape.root_params * cb + 2 * shape.layer_params * cb if flags.fsdp and flags.world > 1 else (
        shape.params * cb if cb < pb else 0)
    out = {"parameters": int(shape.params * pb * shard), "optimizer": 0, "gradients": 0,
           "activations": int(2 * act_layer + 2 * layer_in),  # no_grad: one layer's working tensors at a time
           "loss_workspace": sum(loss_workspace(shape.vocab, tokens, loss, flags.device, cb)),
           "gathered_units": int(gathered)}
    out["peak"] = int(out["parameters"] + gathered + out["activations"] + out["loss_workspace"])
    return out


def plan_generate(shape: Shape, flags: Flags, batch: int, prompt: int, new: int) -> dict[str, int]:
    """Per-rank bytes of align-proxy's sampling: the KV cache of `batch` sequences of prompt + new tokens."""
    cb = DTYPE_BYTES[compute_dtype(flags)]
    out = plan_infer(shape, flags, batch * prompt, prompt, "topk")
    out["kv_cache"] = 2 * shape.layers * shape.kv_dim * batch * (prompt + new) * cb
    out["loss_workspace"] = batch * shape.vocab * 4 * 2  # the last position's logits and probabilities
    out["peak"] = int(out["parameters"] + out["gathered_units"] + out["activations"] + out["kv_cache"]
                      + out["loss_workspace"])
    return out


def fits(peak: int, gb: int) -> bool:
    """Whether `peak` bytes fit a GPU of `gb` GB, RESERVED kept free."""
    return peak + RESERVED <= gb * 10**9


# ----- the paper's setting --------------------------------------------------------------------------------

STAGES = {  # stage -> (model role, kind, loss): one DPO pair is 2 sequences
    "align-proxy (SFT / DPO step)": ("proxy", "train", "dpo"),
    "align-proxy (reference log-probs)": ("proxy", "infer", "logprobs"),
    "align-proxy (sampling, 8 prompts)": ("proxy", "generate", "topk"),
    "precompute": ("proxy", "infer", "topk"),
    "distill (offline targets)": ("student", "train", "kd_offline"),
    "distill (online proxy)": ("student", "train", "kd_online"),
    "eval (held-out NLL)": ("student", "infer", "ce"),
    "eval (KL to the proxy)": ("student", "infer", "kd_online"),
}


def plan_stage(stage: str, proxy: Shape, student: Shape, flags: Flags, tokens: int) -> dict[str, int]:
    """The plan of one stage of the pipeline with `proxy` and `student` at `tokens` tokens per sequence."""
    role, kind, loss = STAGES[stage]
    model = proxy if role == "proxy" else student
    seqs = 2 if loss == "dpo" else 1
    if kind == "train":
        return plan_train(model, flags, seqs * tokens, tokens, loss, proxy if loss == "kd_online" else None)
    if kind == "generate":
        return plan_generate(model, flags, 8, tokens // 2, tokens // 2)
    out = plan_infer(model, flags, seqs * tokens, tokens, loss)
    if stage.startswith("eval (KL"):  # the reference model (the proxy) runs alongside
        ref = plan_infer(proxy, flags, tokens, tokens, loss)
        out["peak"] += ref["parameters"] + ref["gathered_units"]
    return out


def flag_sets(kind: str, world: int, lora: bool) -> list[Flags]:
    """The flag combinations planned for one world size: DDP or --fsdp, with or without checkpointing (training),
    fp32 master weights or bf16 ones; bf16 compute throughout."""
    sets = []
    for fsdp in ((False, True) if world > 1 else (False,)):
        for ckpt in ((False, True) if kind == "train" else (False,)):
            for dtype in ("float32", "bfloat16"):
                sets.append(Flags(world=world, fsdp=fsdp, gradient_checkpointing=ckpt, lora=lora, dtype=dtype))
    return sets


def smallest(stage: str, proxy: Shape, student: Shape, tokens: int, lora: bool) -> tuple[Flags, int, int] | None:
    """(flags, GB, peak) of the fewest, then smallest GPUs that run `stage` (fp32 master weights preferred)."""
    kind = STAGES[stage][1]
    for world in WORLDS:
        for gb in GPU_GB:
            for flags in flag_sets(kind, world, lora):
                peak = plan_stage(stage, proxy, student, flags, tokens)["peak"]
                if fits(peak, gb):
                    return flags, gb, peak
    return None


def on_eight_80gb(stage: str, proxy: Shape, student: Shape, tokens: int, lora: bool) -> tuple[Flags, int] | None:
    """The flags that run `stage` on 8 x 80 GB with the most headroom kept simple: FSDP, fp32 master weights,
    checkpointing only when needed."""
    kind = STAGES[stage][1]
    for dtype in ("float32", "bfloat16"):
        for ckpt in ((False, True) if kind == "train" else (False,)):
            flags = Flags(world=8, fsdp=True, gradient_checkpointing=ckpt, lora=lora, dtype=dtype)
            peak = plan_stage(stage, proxy, student, flags, tokens)["peak"]
            if fits(peak, 80):
                return flags, peak
    return None


def _cell(peak: int) -> str:
    ok = [gb for gb in GPU_GB if fits(peak, gb)]
    return f"{peak / GiB:.1f} GiB" + (f" (fits {ok[0]} GB)" if ok else " (no fit)")


def report(proxy: Shape, student: Shape, tokens: int, lora: bool, markdown: bool = False) -> str:
    """The per-rank peaks of every stage and flag set for 1/2/4/8 ranks, and which GPUs they fit."""
    head = ["stage", "flags", *(f"{w} rank{'s' if w > 1 else ''}" for w in WORLDS)]
    rows = []
    for stage, (_, kind, _) in STAGES.items():
        for flags in flag_sets(kind, 2, lora):
            cells = []
            for world in WORLDS:
                f = dataclasses.replace(flags, world=world, fsdp=flags.fsdp and world > 1)
                cells.append(_cell(plan_stage(stage, proxy, student, f, tokens)["peak"]))
            name = ("--fsdp" if flags.fsdp else "DDP") + f" --dtype {flags.dtype}" + (
                " --gradient-checkpointing" if flags.gradient_checkpointing else "")
            rows.append([stage, name, *cells])
    return table(head, rows, markdown)


def table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A markdown table, or aligned plain text."""
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *rows])


def main(argv: list[str] | None = None) -> None:
    """Print the plan of the paper's setting (a Llama-2-70B proxy, a 7B student) and the per-model breakdowns."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy", default="llama-2-70b")
    ap.add_argument("--student", default="llama-2-7b")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (the paper: 1024)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of the paper's LoRA")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    proxy = shape_of(load_config(args.proxy), args.proxy)
    student = shape_of(load_config(args.student), args.student)
    lora = not args.full
    print(f"proxy {proxy.name}: {proxy.params / 1e9:.2f}B parameters; student {student.name}: "
          f"{student.params / 1e9:.2f}B; {args.tokens} tokens per sequence, micro-batch 1 (a DPO pair: 2), "
          f"bf16 compute, fp32 master weights, {'LoRA r=16' if lora else 'full fine-tuning'}; per-rank peak")
    print(report(proxy, student, args.tokens, lora, args.markdown))
    rows = []
    for stage in STAGES:
        eight = on_eight_80gb(stage, proxy, student, args.tokens, lora)
        small = smallest(stage, proxy, student, args.tokens, lora)
        rows.append([stage, f"{eight[0].describe()}: {eight[1] / GiB:.1f} GiB" if eight else "does not fit",
                     f"{small[0].describe()} on {small[1]} GB: {small[2] / GiB:.1f} GiB" if small else "none planned"])
    print("\nThe paper's setting on 8 x 80 GB, and the smallest setup per stage (fewest GPUs, then the smallest):")
    print(table(["stage", "8 x 80 GB: flags, per-rank peak", "smallest setup, per-rank peak"], rows, args.markdown))
    print("\nBreakdown at 8 ranks, --fsdp, fp32 master weights, checkpointing for training (GiB):")
    for stage in STAGES:
        flags = Flags(world=8, fsdp=True, gradient_checkpointing=STAGES[stage][1] == "train", lora=lora)
        parts = plan_stage(stage, proxy, student, flags, args.tokens)
        print(f"  {stage}: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items()))
    print("\nThe loss's logit memory for the same batch, fused [rows, V] chunks vs materialised [tokens, V] logits "
          "(bf16 compute; GiB):")
    loss_rows = []
    for model in (proxy, student):
        for loss in ("ce", "kd_offline", "kd_online", "dpo"):
            for seqs in (1, 8):
                n = args.tokens * seqs * (2 if loss == "dpo" else 1)
                fused = sum(loss_workspace(model.vocab, n, loss, "cuda", 2))
                loss_rows.append([model.name, loss, str(n), f"{fused / GiB:.3f}",
                                  f"{naive_logits(model, n, loss, 2) / GiB:.3f}"])
    print(table(["model", "loss", "tokens", "fused", "naive logits"], loss_rows, args.markdown))
    print(f"\nFits: peak + {RESERVED / GiB:.0f} GiB reserved <= the GPU's memory. Host memory to load under --fsdp: "
          f"the main process reads the weights ({proxy.params * 4 / GiB:.0f} GiB for the proxy in fp32), "
          "the others only receive their shards.")


if __name__ == "__main__":
    main()

__all__ = ["Flags", "Shape", "load_config", "naive_logits", "plan_infer", "plan_train", "shape_of"]
