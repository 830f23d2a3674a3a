"""Loading, sampling and scoring with transformers models: the same code for the tiny synthetic checkpoints and for
real ones (a path or a hub id; from_pretrained either way).

    python -c "from games.llm_rlhf.models import load_policy; print(load_policy('runs/llm_synthetic/init/policy'))"

- policy: any AutoModelForCausalLM, optionally with LoRA adapters (peft) and a 4-bit base (bitsandbytes);
- reference: a frozen copy of the policy, or the LoRA policy with its adapters disabled (no second copy);
- reward model: any AutoModelForSequenceClassification with a linear head of one output (`score` in decoder
  models, `classifier` in encoders such as deberta); `head_features` returns that head's input, so that when
  only the head trains the reward is `features @ w + b` and nothing else of the RM ever runs twice.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in every run's output


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_policy(path: str, dtype: str = "float32", lora: bool = False, lora_r: int = 16, lora_alpha: int = 32,
                lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                load_in_4bit: bool = False):
    """(policy, tokenizer) from a folder or hub id; LoRA adapters on `lora_targets` when `lora`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    kwargs: Dict = {"dtype": _dtype(dtype)}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=_dtype(dtype))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # prompts are left-padded so that every answer starts at the same column
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if lora:
        from peft import LoraConfig, get_peft_model

        if load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model)
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(lora_targets), task_type="CAUSAL_LM"))
    return model, tokenizer


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with no trainable parameters (the reference policy)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def load_reward_model(path: str, train: str = "head", dtype: str = "float32"):
    """(reward model, tokenizer, head) from a folder or hub id; `train` = 'head' freezes all but the head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet()
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    head = reward_head(model)
    if train not in ("head", "all"):
        raise ValueError(f"game.rm_train must be 'head' or 'all', got {train!r}")
    for p in model.parameters():
        p.requires_grad_(train == "all")
    for p in head.parameters():
        p.requires_grad_(True)
    return model.eval(), tokenizer, head


def reward_head(model: nn.Module) -> nn.Linear:
    """The RM's final linear layer with one output (`score`, `classifier`, or the last such Linear)."""
    for name in ("score", "classifier", "v_head"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear) and module.out_features == 1:
            return module
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear head with one output")
    return linears[-1]


@torch.no_grad()
def head_features(model: nn.Module, head: nn.Linear, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, H]: the input of the RM's head for each sequence, pooled where the model pools its logits.

    Decoder RMs apply the head at every position and keep the last non-pad token's logit; encoder RMs apply it to
    a pooled vector. Captured with a forward hook, so any architecture of either kind works.
    """
    seen: List[Tensor] = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        hook.remove()
    feats = seen[-1]
    if feats.dim() == 3:  # decoder: pool at the last non-pad token, as transformers does
        pad = model.config.pad_token_id
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * (input_ids != pad).int()).argmax(-1)
        feats = feats[torch.arange(feats.shape[0], device=feats.device), last]
    check = head(feats).view(-1)
    if not torch.allclose(check.float(), logits.view(-1).float(), atol=1e-3, rtol=1e-3):
        raise ValueError("the RM's head applied to the captured features does not give its logits: "
                         "this architecture needs game.rm_train=all")
    return feats.float()


def rm_inputs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> Dict[str, Tensor]:
    """Tokenise (prompt, answer) pairs for the RM with its own tokenizer (policy and RM vocabularies may differ)."""
    return dict(tokenizer(list(prompts), list(responses), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool, device) -> Dict[str, Tensor]:
    """Left-padded prompt ids; through the tokenizer's chat template when `chat_template` (instruct models)."""
    if chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(list(prompts), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompt: Dict[str, Tensor], n: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> Tuple[Tensor, Tensor]:
    """(answers [B*n, T], mask [B*n, T]): n answers per prompt, the mask covering each answer up to its <eos>.

    Randomness comes from torch's global generator (the game's own stream during a round).
    """
    from transformers import GenerationConfig

    ids = prompt["input_ids"].repeat_interleave(n, 0)
    mask = prompt["attention_mask"].repeat_interleave(n, 0)
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, top_k=0, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    specials = [t for t in {tokenizer.pad_token_id, tokenizer.bos_token_id} - {tokenizer.eos_token_id}
                if t is not None]
    if specials:
        config.suppress_tokens = specials  # never sample padding or a second <bos>
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    answers = out[:, ids.shape[1]:]
    return answers, answer_mask(answers, tokenizer.eos_token_id)


def answer_mask(answers: Tensor, eos: int) -> Tensor:
    """1 on each answer's tokens up to and including its first <eos>, 0 after it."""
    is_eos = (answers == eos).int()
    after = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after).long()


def answer_lengths(answers: Tensor, mask: Tensor, eos: int) -> Tensor:
    """Number of tokens of each answer before its <eos>."""
    return (mask * (answers != eos).long()).sum(-1).float()


def sequence_logp(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, answers: Tensor, mask: Tensor,
                  mean: bool = False) -> Tensor:
    """Per-answer log-probability under `model` (sum over the answer's tokens, or their mean), with graph."""
    full = torch.cat([prompt_ids, answers], 1)
    attention = torch.cat([prompt_mask, mask], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=attention, position_ids=positions).logits
    logits = logits[:, prompt_ids.shape[1] - 1: -1].float()
    token_logp = torch.log_softmax(logits, -1).gather(-1, answers.unsqueeze(-1)).squeeze(-1) * mask
    total = token_logp.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if mean else total


def decode(tokenizer, answers: Tensor, mask: Tensor) -> List[str]:
    """The answers as text (special tokens dropped)."""
    return [tokenizer.decode(row[: int(m.sum())].tolist(), skip_special_tokens=True)
            for row, m in zip(answers, mask)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run a peft model as its base model (the LoRA reference); a no-op for other models."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def count_parameters(model: nn.Module, trainable: Optional[bool] = None) -> int:
    """Number of (trainable, frozen or all) parameters."""
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)
