"""The paper's proxy alignment on TRL: SFT warm-up, then K rounds of NLL + DPO against the proxy's own samples.

Round r samples one answer per prompt from the current proxy (the rejected side), keeps the teacher's
answer as chosen, fixes the reference to the proxy at the round's start (its summed log-probs become
the `ref_chosen_logps` / `ref_rejected_logps` columns before the round trains), and trains with
`ProxyDPOTrainer` (`loss_type=["sigmoid", "sft"]` gives L = DPO + w * NLL of the teacher answer).

    from proxykd_fast.integrations.trl import ProxyDPOConfig, ProxyKDConfig, align_proxy
    result = align_proxy(proxy, tokenizer, teacher_data,               # prompt / completion rows
                         sft_args=ProxyKDConfig("out/sft", alpha=0.0, num_train_epochs=1),
                         dpo_args=ProxyDPOConfig("out/dpo", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]),
                         rounds=2)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .dpo import ProxyDPOConfig, ProxyDPOTrainer
from .kd import ProxyKDConfig, ProxyKDTrainer


def frozen_copy(model: nn.Module) -> nn.Module:
    """A no-grad eval copy of `model` without instance-level forward patches (TRL's fused-head closures
    would still run the original model)."""
    from proxykd_fast.integrations.hf import causal_lm

    ref = copy.deepcopy(model).eval()
    for m in {id(ref): ref, id(causal_lm(ref)): causal_lm(ref)}.values():
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_proxykd_fused_head", None)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a prompt as TRL tokenizes it: chat template with generation prompt, or plain text."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer: Any, prompts: list[Any], *, max_new_tokens: int = 64,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
                       like: list[Any] | None = None) -> list[Any]:
    """One sampled completion per prompt, in the prompts' format (text, or an assistant message).

    `like[i]` (the chosen completion) lends its leading whitespace to a text sample that lacks it, so
    prompt + completion tokenizes as two parts, as the chosen one does.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[Any] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sample rejected", leave=False):
        chunk = prompts[start : start + batch_size]
        ids = [_prompt_ids(tokenizer, p) for p in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, x in enumerate(ids):  # left padding for generation
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=pad)
        for i, row in enumerate(gen[:, width:].tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True)
            if isinstance(chunk[i], str):
                ref = like[start + i] if like is not None else ""
                lead = ref[: len(ref) - len(ref.lstrip())] if isinstance(ref, str) else ""
                out.append(text if text[:1].isspace() or not lead else lead + text)
            else:
                out.append([{"role": "assistant", "content": text}])
    model.train(was_training)
    return out


def align_proxy(model: nn.Module, processing_class: Any, train_dataset: Any, *, sft_args: ProxyKDConfig,
                dpo_args: ProxyDPOConfig, rounds: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
                top_p: float = 1.0, generation_batch_size: int = 8, seed: int = 0,
                callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Align `model` (the proxy) to the teacher answers in `train_dataset` (prompt / completion rows).

    Returns {"model", "sft": log history, "rounds": [{"dataset": preference rows with ref columns,
    "log_history"}]}. Each round's output goes to `dpo_args.output_dir/round-<r>`. The reference of a
    round is a frozen copy of the proxy at its start (it scores the round's pairs, then is freed).
    """
    if not isinstance(sft_args, ProxyKDConfig) or sft_args.alpha != 0:
        raise ValueError("sft_args must be a ProxyKDConfig with alpha=0 (the warm-up is plain NLL)")
    if not isinstance(dpo_args, ProxyDPOConfig):
        raise TypeError(f"dpo_args must be a ProxyDPOConfig, got {type(dpo_args).__name__}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if dpo_args.sample_weight_column is not None:
        raise ValueError("dpo_args.sample_weight_column is not supported by align_proxy: it builds its own pairs "
                         "(teacher answer chosen, proxy sample rejected) each round; use use_weighting=True for WPO "
                         "weights, or ProxyDPOTrainer directly on a weighted pairs dataset")
    columns = set(train_dataset.column_names)
    if not {"prompt", "completion"} <= columns:
        raise ValueError(f"train_dataset must have prompt and completion columns, got {sorted(columns)}")
    sft = ProxyKDTrainer(model, args=sft_args, train_dataset=train_dataset, processing_class=processing_class,
                         callbacks=callbacks)
    sft.train()
    result: dict[str, Any] = {"model": model, "sft": sft.state.log_history, "rounds": []}
    prompts, chosen = list(train_dataset["prompt"]), list(train_dataset["completion"])
    for r in range(1, rounds + 1):
        rejected = sample_completions(model, processing_class, prompts, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, batch_size=generation_batch_size,
                                      seed=seed * 1000 + r, like=chosen)
        from datasets import Dataset

        pairs = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
        reference = frozen_copy(model)
        args = copy.deepcopy(dpo_args)
        args.output_dir, args.precompute_ref_log_probs = f"{dpo_args.output_dir}/round-{r}", True
        trainer = ProxyDPOTrainer(model, ref_model=reference, args=args, train_dataset=pairs,
                                  processing_class=processing_class, callbacks=callbacks)
        trainer.ref_model = None  # the reference lives on as the precomputed columns
        del reference
        scored = trainer.train_dataset
        trainer.train()
        result["rounds"].append({"dataset": scored, "log_history": trainer.state.log_history})
    return result
