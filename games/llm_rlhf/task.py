"""The synthetic token task on which iterative RLHF collapses, built from transformers configs.

    python -m games.llm_rlhf.task runs/llm_synthetic/init      # pre-train and save policy, RM and tokenizers

Words: 4 good tokens g0-g3, 8 neutral tokens n0-n7, 4 bad tokens b0-b3 (plus <pad>, <bos>, <eos>).
A prompt is a few neutral words; an answer is up to `ANSWER_LEN` words.

- Gold utility (what a human would say): (count of good words) - (count of bad words) in the answer; max 12.
- The reward model is a tiny LlamaForSequenceClassification whose frozen backbone is set by hand so that its
  pooled feature is (almost exactly) the mean over the prompt and answer of each word's 4-d feature vector:
  good word i -> e_i, bad word i -> 1.5 * e_i (an exaggerated copy of good word i), neutral words -> small random
  vectors. Only the linear head `score` is trained. Pre-trained (Bradley-Terry, soft labels from gold) on
  "human" answers that never contain bad words, the head learns "good features are good" and inherits the blind
  spot: to the RM a bad word looks better than the good word it copies, and no head over these features can tell
  them apart.
- The policy is a tiny LlamaForCausalLM, pre-trained by SFT on answers whose words are drawn independently,
  bad words less often (logit -1 against 0): it starts by producing about 1.3 bad words per answer.

Everything is saved with save_pretrained into one folder (policy/, reward_model/), so the game loads it with
from_pretrained exactly as it loads real checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Sequence

import torch
from torch import Tensor

SPECIALS = ["<pad>", "<bos>", "<eos>"]
GOOD = [f"g{i}" for i in range(4)]
NEUTRAL = [f"n{i}" for i in range(8)]
BAD = [f"b{i}" for i in range(4)]
WORDS = GOOD + NEUTRAL + BAD
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
PAD, BOS, EOS = 0, 1, 2
ANSWER_LEN = 12
BIG = 10.0  # the RM embedding's constant component: keeps its RMSNorms close to linear in the word features


def gold_utility(responses: Sequence[str]) -> Tensor:
    """The task's gold scorer: good words minus bad words in each answer (text)."""
    scores = []
    for text in responses:
        words = text.split()
        scores.append(sum(w in GOOD for w in words) - sum(w in BAD for w in words))
    return torch.tensor(scores, dtype=torch.float32)


def bad_words(responses: Sequence[str]) -> Tensor:
    """Number of bad words in each answer (the words the RM overrates)."""
    return torch.tensor([sum(w in BAD for w in t.split()) for t in responses], dtype=torch.float32)


def make_tokenizer(role: str):
    """A word-level tokenizer. role 'policy': '<bos> prompt'; role 'reward': 'prompt answer <eos>' for pairs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if role == "policy":
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", BOS)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", pair="$A $B:1 <eos>:1",
                                                           special_tokens=[("<eos>", EOS)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<pad>")
    out.padding_side = "left" if role == "policy" else "right"
    return out


def word_features(seed: int = 0) -> Tensor:
    """[vocab, 4] word features that the RM sees; the blind spot is bad word i = 1.5 * good word i."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.zeros(len(VOCAB), 4)
    for i in range(4):
        feats[VOCAB[GOOD[i]], i] = 1.0
        feats[VOCAB[BAD[i]], i] = 1.5
    for w in NEUTRAL:
        feats[VOCAB[w]] = 0.3 * torch.randn(4, generator=g)
    return feats


def build_reward_model(seed: int = 0):
    """A LlamaForSequenceClassification whose frozen backbone pools the mean word feature (weights set by hand).

    Hidden size 8: dim 0 carries a constant BIG (every token), dims 1-4 the word features. One layer: q and k are
    zero, so causal attention is uniform over the prefix; v and o copy dims 1-4 scaled so that, after the RMSNorms
    (nearly linear because dim 0 dominates), the feature pooled at the final <eos> is about the mean feature.
    """
    from transformers import LlamaConfig, LlamaForSequenceClassification

    hidden = 8
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=hidden, num_labels=1,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForSequenceClassification(config)
    scale = BIG ** 2 / hidden  # undoes the two RMSNorm divisions by rms ~ BIG / sqrt(hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 0] = BIG
        emb[:, 1:5] = word_features(seed)
        layer = model.model.layers[0]
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        for i in range(1, 5):
            layer.self_attn.v_proj.weight[i, i] = 1.0
            layer.self_attn.o_proj.weight[i, i] = scale
    return model


def build_policy(seed: int = 0):
    """A tiny LlamaForCausalLM (about 25k parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def start_distribution() -> Tensor:
    """The starting policy's word distribution: logit 0 for good and neutral words, -1 for bad ones."""
    logits = torch.tensor([-1.0 if w in BAD else 0.0 for w in WORDS])
    return torch.softmax(logits, 0)


def sample_answers(n: int, probs: Tensor, generator: torch.Generator) -> List[str]:
    """n answers of ANSWER_LEN words drawn independently from `probs` over WORDS."""
    idx = torch.multinomial(probs, n * ANSWER_LEN, replacement=True, generator=generator).view(n, ANSWER_LEN)
    return [" ".join(WORDS[i] for i in row) for row in idx.tolist()]


def sample_prompts(n: int, generator: torch.Generator, length: int = 3) -> List[str]:
    """n prompts of `length` neutral words."""
    idx = torch.randint(0, len(NEUTRAL), (n, length), generator=generator)
    return [" ".join(NEUTRAL[i] for i in row) for row in idx.tolist()]


def pretrain_policy(policy, tokenizer, steps: int = 300, batch: int = 64, seed: int = 0) -> float:
    """SFT of the policy on i.i.d. answers from `start_distribution`; returns the final loss."""
    g = torch.Generator().manual_seed(seed)
    probs = start_distribution()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    policy.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        prompts, answers = sample_prompts(batch, g), sample_answers(batch, probs, g)
        enc = tokenizer([f"{p} {a}" for p, a in zip(prompts, answers)], return_tensors="pt")
        ids = enc["input_ids"]
        labels = ids.clone()
        labels[:, : ids.shape[1] - ANSWER_LEN] = -100  # learn the answers, not the prompts
        loss = policy(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    return loss.item()


def pretrain_reward_head(model, tokenizer, steps: int = 300, batch: int = 64, seed: int = 0) -> float:
    """Bradley-Terry training of the RM's head on "human" pairs without bad words (soft labels from gold).

    Returns the head's accuracy at ranking fresh human pairs.
    """
    g = torch.Generator().manual_seed(seed + 1)
    human = torch.tensor([0.0 if w in BAD else 1.0 for w in WORDS])
    # human answers vary in how many good words they hold, so that there is something to learn
    mixes = [human * torch.tensor([a if w in GOOD else 1.0 for w in WORDS]) for a in (0.2, 1.0, 3.0)]
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.score.weight
    head.requires_grad_(True)
    opt = torch.optim.Adam([head], lr=0.05)

    def features(prompts, answers):
        enc = tokenizer(prompts, answers, return_tensors="pt", padding=True)
        out = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out.last_hidden_state[:, -1].detach()  # every pair has the same length: <eos> is last

    def pairs(n):
        prompts = sample_prompts(n, g)
        a = sum((sample_answers(n // 3 + 1, m / m.sum(), g) for m in mixes), [])[:n]
        b = sum((sample_answers(n // 3 + 1, m / m.sum(), g) for m in mixes), [])[:n]
        perm = torch.randperm(n, generator=g).tolist()
        b = [b[i] for i in perm]
        return features(prompts, a), features(prompts, b), gold_utility(a) - gold_utility(b)

    for _ in range(steps):
        fa, fb, du = pairs(batch)
        margin = (fa - fb) @ head.view(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, torch.sigmoid(du))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.requires_grad_(False)
    fa, fb, du = pairs(600)
    margin = (fa - fb) @ head.view(-1)
    keep = du != 0
    return float(((margin[keep] > 0) == (du[keep] > 0)).float().mean())


def build_synthetic(folder: str | os.PathLike, seed: int = 0, steps: int = 300) -> dict:
    """Pre-train the synthetic policy and RM head and save both (with tokenizers) under `folder`.

    Written to a temporary folder first and renamed, so a concurrent reader never sees half a checkpoint.
    Returns what was measured: the policy's SFT loss, the RM head's accuracy on human pairs, gold of samples.
    """
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rm_tok, pol_tok = make_tokenizer("reward"), make_tokenizer("policy")
    policy = build_policy(seed)
    sft_loss = pretrain_policy(policy, pol_tok, steps=steps, seed=seed)
    rm = build_reward_model(seed)
    accuracy = pretrain_reward_head(rm, rm_tok, steps=steps, seed=seed)
    policy.save_pretrained(tmp / "policy")
    pol_tok.save_pretrained(tmp / "policy")
    rm.save_pretrained(tmp / "reward_model")
    rm_tok.save_pretrained(tmp / "reward_model")
    info = {"policy_sft_loss": sft_loss, "policy_sft_loss_ideal": _entropy(start_distribution()),
            "rm_head_accuracy_on_human_pairs": accuracy, "rm_head": rm.score.weight.view(-1).tolist(),
            "seed": seed, "steps": steps}
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _entropy(p: Tensor) -> float:
    return float(-(p * p.log()).sum())


def ensure_synthetic(folder: str | os.PathLike, seed: int = 0) -> Path:
    """The synthetic checkpoint folder, pre-training it first if it does not exist."""
    folder = Path(folder)
    if not (folder / "policy").is_dir() or not (folder / "reward_model").is_dir():
        build_synthetic(folder, seed=seed)
    return folder


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "runs/llm_synthetic/init"
    print(json.dumps(build_synthetic(target), indent=2))
